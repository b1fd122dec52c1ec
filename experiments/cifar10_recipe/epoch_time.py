"""Wall time of one training epoch of the short CIFAR-10 (JPEG) recipe, one thread.

The recipe: ``conf/experiment/cifar10_recipe/`` (issue 20, item 1). For each
network, ``eenet-train``'s own ``train()`` runs the recipe's experiment config for
ONE epoch at one thread (``threads=1``) on the full split (45,000 training images,
batch 256), with no checkpoints and no logger; reported per network:

- ``train_epoch_s``: the training epoch alone (steps and data loading; eenet's
  EpochTimer), wall clock;
- ``train_epoch_cpu_s``: the CPU seconds the process spent in that epoch (one
  thread: about the wall time on an otherwise idle core), the figure to multiply
  by the epoch count for CPU hours;
- ``wall_s``: the whole call (loading the JPEG folders, the epoch, validation on
  5,000 and the test split on 10,000 images at every exit);
- the test accuracy after this single epoch, measured but meaningless for the recipe:
  with ``trainer.max_epochs=1`` the one-cycle schedule (counted in epochs) trains the
  whole epoch at its lowest rate.

``--train-subset N`` times an epoch on 0.9 N images instead (N / 10 go to val, and
the test split is cut to N / 10; labelled in the JSON as a subset) where a full epoch
would take too long. The machine and any other load on
it are recorded (``save_report``'s ``machine``, the 1-minute load average before
and after each run, ``--note``): on a shared machine the figures are upper bounds.

    python experiments/cifar10_recipe/epoch_time.py --data ../shared/data
    python experiments/cifar10_recipe/epoch_time.py --models resnet20_sdn trecx_resnet8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import torch

from eenet.config import compose_config
from eenet.jobs.train import train
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"
RUNS = HERE / "runs"  # not committed (.gitignore: experiments/**/runs/)
MODELS = ("resnet20", "resnet8", "resnet20_sdn", "trecx_resnet8")


class EpochCPU(L.Callback):
    """CPU seconds of this process over each training epoch (``time.process_time``): on a shared
    machine the wall time grows with the other jobs' load, the CPU time much less."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.seconds.append(time.process_time() - self._start)


def time_one(model: str, args) -> dict:
    out = RUNS / (f"epoch_{model}" + ("" if args.train_subset is None else f"_n{args.train_subset}"))
    overrides = [f"experiment=cifar10_recipe/{model}", f"data_root={args.data}", "threads=1",
                 "trainer.max_epochs=1", "logger=none", "checkpoint.enabled=false",
                 "anytime=false", "trainer.enable_progress_bar=false", f"seed={args.seed}",
                 "overwrite=true"]
    if args.train_subset is not None:
        n_val = max(1, args.train_subset // 10)  # the val split is taken from the subset
        overrides += [f"dataset.datamodule.train_subset={args.train_subset}",
                      f"dataset.datamodule.val_size={n_val}",
                      f"dataset.datamodule.test_subset={n_val}"]
    cfg = compose_config(overrides, output_dir=out)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cpu = EpochCPU()
    results, _ = train(cfg, extra_callbacks=[cpu])
    wall = time.perf_counter() - t0
    row = {"model": model, "experiment": f"cifar10_recipe/{model}", "overrides": overrides,
           "threads": torch.get_num_threads(),
           "train_images": int(results["splits"]["train"]),
           "subset": args.train_subset is not None,
           "batch_size": int(cfg.dataset.datamodule.batch_size),
           "train_epoch_s": float(results["train_epoch_seconds"][0]),
           "train_epoch_cpu_s": cpu.seconds[0],
           "wall_s": wall,
           "backbone_macs": int(results["backbone_macs"]),
           "exit_cost_fractions": [float(e["cost_fraction"]) for e in results["exits"]],
           "test_accuracy_after_1_epoch": [float(e["test_accuracy"]) for e in results["exits"]],
           # 1-minute load averages of the machine (its other jobs included) around the run
           "load_average_before_after": [load_before[0], os.getloadavg()[0]],
           "cpu_count": os.cpu_count()}
    print(json.dumps({k: row[k] for k in ("model", "train_images", "train_epoch_s",
                                          "train_epoch_cpu_s", "wall_s")}),
          flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="data root holding cifar10-jpeg/")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet8"], choices=MODELS)
    parser.add_argument("--train-subset", type=int, default=None,
                        help="time an epoch on this many training images (labelled a subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="recorded as is (e.g. other load on the machine)")
    parser.add_argument("--suffix", default="", help="added to the JSON's name")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [time_one(m, args) for m in args.models]
    print(markdown_table(["model", "train images", "batch", "1 epoch wall (s)", "1 epoch CPU (s)",
                          "whole run (s)"],
                         [[r["model"], r["train_images"], r["batch_size"],
                           f"{r['train_epoch_s']:.1f}", f"{r['train_epoch_cpu_s']:.1f}",
                           f"{r['wall_s']:.1f}"] for r in rows]))
    path = save_report(__file__, {"rows": rows, "note": args.note,
                                  "threads": 1, "data": "CIFAR-10 (JPEG)"},
                       args.suffix, seeds=[args.seed], chosen_on={})
    print(f"written {path}")


if __name__ == "__main__":
    main()
