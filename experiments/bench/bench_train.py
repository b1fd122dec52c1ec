"""Training throughput: resnet20 with 2 exits against the plain resnet20, same Lightning loop.

Both networks are built by eenet's own builder and trained by the same
``EarlyExitModule`` and ``lightning.Trainer`` (eenet_v2 loss, Adam), batch 128,
2 threads, on MNIST training images (../shared/data; the bundled digits,
upsampled to 28x28, when MNIST is absent). The runs alternate plain / early-exit
``--reps`` times in one process, each timing ``--batches`` training steps after
``--warmup`` untimed ones (data loading included: the loop as a user runs it).
Reported: images per second per run, their medians, and the ratio
early-exit / plain (target >= 0.8), also as the median of per-repetition ratios.

    python experiments/bench/bench_train.py
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from eenet.build import build_early_exit_network
from eenet.cost import exit_cost_table
from eenet.data import ClassificationDataModule
from eenet.losses import EENetLoss
from eenet.models import ExitBlock, create_backbone
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.training import EarlyExitModule

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"
SEED = 0


class StepTimer(L.Callback):
    """Wall time from the end of warm-up step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = None
        self.images = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.start = now
        elif batch_idx >= self.warmup:
            self.images += batch[0].shape[0]
            self.end = now


def make_module(exits: list[int], exit_kind: str, input_size) -> EarlyExitModule:
    backbone = create_backbone("resnet20", num_classes=10, in_chans=input_size[0])
    net = build_early_exit_network(backbone, functools.partial(ExitBlock, preblock=exit_kind),
                                   "explicit", stages=exits, input_size=input_size)
    cost = exit_cost_table(net)
    return EarlyExitModule(net, EENetLoss(2, 1.0), cost.fractions,
                           optimizer=functools.partial(torch.optim.Adam, lr=1e-3))


def throughput(module, dm, args) -> float:
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=args.warmup + args.batches,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer.images / (timer.end - timer.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--exits", nargs="+", default=["plain", "pool"],
                   help="exit pre-blocks to benchmark (conf/exit)")
    args = p.parse_args()
    torch.set_num_threads(2)
    L.seed_everything(SEED, verbose=False)

    mnist = Path(args.data, "MNIST", "raw").is_dir()
    dm = ClassificationDataModule(
        "mnist" if mnist else "digits", args.data, mean=[0.1307] if mnist else [0.3053],
        std=[0.3081] if mnist else [0.3760], val_size=1000 if mnist else 0.1, batch_size=128)
    dm.setup("fit")
    input_size = dm.input_size
    variants = {"plain resnet20": ([], None)}
    for kind in args.exits:
        variants[f"resnet20 + 2 exits ({kind})"] = ([0, 1], kind)  # = EENets' fine placement
    modules = {name: make_module(ex, kind or "pool", input_size) for name, (ex, kind) in variants.items()}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps):
        for name, module in modules.items():
            runs[name].append(throughput(module, dm, args))
            print(f"rep {rep}: {name}: {runs[name][-1]:.0f} images/s", flush=True)

    plain = runs["plain resnet20"]
    rows, summary = [], {}
    for name, vals in runs.items():
        ratio = statistics.median(vals) / statistics.median(plain)
        per_rep = statistics.median(v / b for v, b in zip(vals, plain))
        summary[name] = {"images_per_s": vals, "median": statistics.median(vals),
                         "ratio_of_medians": ratio, "median_of_per_rep_ratios": per_rep}
        rows.append([name, f"{statistics.median(vals):.0f}",
                     " ".join(f"{v:.0f}" for v in vals), f"{ratio:.3f}", f"{per_rep:.3f}"])
    table = markdown_table(["model", "median images/s", "runs", "ratio to plain",
                            "median per-rep ratio"], rows)
    print(f"\nTraining throughput on {'MNIST' if mnist else 'digits'} {tuple(input_size)}, "
          f"batch 128, {torch.get_num_threads()} threads, {args.batches} timed steps x {args.reps} reps\n")
    print(table)
    path = save_report(__file__, {"dataset": "mnist" if mnist else "digits", "batch_size": 128,
                                  "threads": torch.get_num_threads(), "settings": vars(args),
                                  "results": summary, "table": table}, seeds=[SEED])
    print(f"saved {path}")


if __name__ == "__main__":
    main()
