"""Memory: peak RSS of training over epochs (no growth after the first), and of the dynamic engine.

Each measurement runs in a fresh process. Training: resnet20 with 2 exits on
the bundled digits for ``--epochs`` epochs through ``eenet.jobs.train.train``; a
callback reads the process's resident set (VmRSS) and its peak (VmHWM) from
/proc/self/status at the end of every epoch. EENets' reference code appended
to a Python list on every batch; here nothing should grow: the target is a
peak RSS after the last epoch at most 5% above the peak after the first.
Inference: the dynamic engine over the digits test set at batch 1 and 256,
peak RSS before and after.

    python experiments/bench/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def child_train(epochs: int) -> dict:
    import lightning as L

    from eenet.config import compose_config
    from eenet.jobs.train import train

    per_epoch = []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            rss, hwm = rss_kib()
            per_epoch.append({"epoch": trainer.current_epoch, "rss_kib": rss, "peak_kib": hwm})

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_config([f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
                              "logger=csv", "threads=2"], output_dir=out)
        train(cfg, extra_callbacks=[Probe()])
    return {"epochs": per_epoch}


def child_engine() -> dict:
    import torch

    from eenet.data.batching import make_loader
    from eenet.inference import DynamicEngine
    from eenet.policies import create_policy
    from eenet.config import compose_config
    from eenet.jobs.train import train

    with tempfile.TemporaryDirectory() as out:
        _, objs = train(compose_config(["trainer.max_epochs=2", "trainer.enable_progress_bar=false",
                                        "logger=none", "checkpoint.enabled=false"], output_dir=out))
        net, dm, cost = objs["net"].eval(), objs["datamodule"], objs["cost"]
        engine = DynamicEngine(net, create_policy("max_prob", 0.9), cost.fractions)
        rows = []
        for bs in (1, 256):
            before = rss_kib()
            for _ in range(3):
                for x, _ in make_loader(dm.test_dataset, bs, shuffle=False):
                    engine(x)
            after = rss_kib()
            rows.append({"batch_size": bs, "rss_before_kib": before[0], "rss_after_kib": after[0],
                         "peak_after_kib": after[1]})
        torch.set_num_threads(2)
    return {"engine": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--child", choices=["train", "engine"])
    args = p.parse_args()
    if args.child:
        out = child_train(args.epochs) if args.child == "train" else child_engine()
        print("RESULT " + json.dumps(out))
        return
    env = {**os.environ, "WANDB_MODE": "disabled"}
    results = {}
    for kind in ("train", "engine"):
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--epochs",
                               str(args.epochs)], env=env, capture_output=True, text=True,
                              check=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results.update(json.loads(line[len("RESULT "):]))
    ep = results["epochs"]
    growth = (ep[-1]["peak_kib"] - ep[0]["peak_kib"]) / ep[0]["peak_kib"]
    rows = [[e["epoch"], f"{e['rss_kib'] / 1024:.1f}", f"{e['peak_kib'] / 1024:.1f}"] for e in ep]
    table = markdown_table(["epoch", "RSS MiB", "peak RSS MiB"], rows)
    eng = [[r["batch_size"], f"{r['rss_before_kib'] / 1024:.1f}", f"{r['rss_after_kib'] / 1024:.1f}",
            f"{r['peak_after_kib'] / 1024:.1f}"] for r in results["engine"]]
    table2 = markdown_table(["engine batch", "RSS before MiB", "RSS after 3 passes MiB",
                             "peak MiB"], eng)
    print(f"Training on digits, {len(ep)} epochs (fresh process):\n\n{table}\n")
    print(f"peak RSS growth from the first to the last epoch: {100 * growth:+.2f}% "
          f"(target <= +5%)\n")
    print(f"Dynamic engine on the digits test set (fresh process):\n\n{table2}")
    path = save_report(__file__, {**results, "peak_growth_after_first_epoch": growth,
                                  "meets_target": growth <= 0.05, "table_train": table,
                                  "table_engine": table2})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
