"""Kill and resume: a run killed with SIGKILL mid-epoch, resumed, ends where an uninterrupted run ends.

On the bundled digits, resnet20 with 2 exits is trained for ``--epochs`` epochs
by ``eenet-train`` (a separate process). The same run is started again in a
second folder and killed with SIGKILL part-way through an epoch, ``--kills``
times, each time after a different number of finished epochs; after every kill
it is continued with ``resume=true``. The final validation/test metrics and the
weights of the killed-and-resumed run are compared with the uninterrupted run.
Checkpoints are written atomically, so a kill never leaves a truncated one.

    python experiments/kill_resume/run.py   # writes results.json beside itself
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs" / "kill_resume"


def command(out: Path, args, extra=()) -> list[str]:
    return [sys.executable, "-m", "eenet.cli.train", f"trainer.max_epochs={args.epochs}",
            "trainer.enable_progress_bar=false", "logger=csv", "trainer.log_every_n_steps=1",
            "dataset.datamodule.batch_size=16", "dataset.datamodule.augment=[crop]", "threads=1",
            f"seed={args.seed}", f"hydra.run.dir={out}", *extra]


def finished_epochs(out: Path) -> int:
    """Epochs finished so far: the epoch of the last checkpoint + 1 (it is replaced atomically)."""
    last = out / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return 0
    return int(torch.load(last, weights_only=True, map_location="cpu")["epoch"]) + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--kills", type=int, nargs="+", default=[1, 3, 4],
                   help="kill once after each of these numbers of finished epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    started = git_revision(__file__)  # the code this run starts with (commits may land before it ends)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    shutil.rmtree(RUNS, ignore_errors=True)

    straight = RUNS / "straight"
    t0 = time.time()
    subprocess.run(command(straight, args), env=env, check=True, capture_output=True)
    straight_s = time.time() - t0

    killed = RUNS / "killed"
    events = []
    resume = False
    for after in args.kills:
        proc = subprocess.Popen(command(killed, args, ["resume=true"] if resume else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        while finished_epochs(killed) < after and proc.poll() is None:
            time.sleep(0.05)  # wait until `after` epochs have their checkpoint...
        # ...then let it get part-way into the next epoch and kill it there
        time.sleep(0.3)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
        events.append({"killed_after_finished_epochs": finished_epochs(killed),
                       "was_running": alive, "last_checkpoint_epoch": ckpt["epoch"],
                       "return_code": proc.returncode})
        print(events[-1], flush=True)
        resume = True
    subprocess.run(command(killed, args, ["resume=true"]), env=env, check=True,
                   capture_output=True)

    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    wa = torch.load(straight / "model.pt", weights_only=True)
    wb = torch.load(killed / "model.pt", weights_only=True)
    max_diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    rows = []
    for split in ("val", "test"):
        rows.append([split, f"{100 * a[split]['accuracy']:.2f}", f"{100 * b[split]['accuracy']:.2f}",
                     f"{a[split]['avg_cost_fraction']:.4f}", f"{b[split]['avg_cost_fraction']:.4f}",
                     a[split] == b[split]])
    rows.append(["val loss", f"{a['val_loss']:.6f}", f"{b['val_loss']:.6f}", "", "",
                 a["val_loss"] == b["val_loss"]])
    table = markdown_table(["split", "uninterrupted acc %", "killed+resumed acc %",
                            "uninterrupted cost", "killed+resumed cost", "equal"], rows)
    equal = all(r[-1] for r in rows)
    print(f"\n{args.epochs} epochs on digits; {len(events)} SIGKILLs mid-epoch, each followed by "
          f"resume=true; max |weight difference| = {max_diff:.3g}\n")
    print(table)
    print(f"\nfinal metrics equal: {equal}")
    path = save_report(str(HERE / "results.json"), {"epochs": args.epochs, "kills": events,
                                  "uninterrupted_s": straight_s, "max_weight_difference": max_diff,
                                  "metrics_equal": equal,
                                  "uninterrupted": {k: a[k] for k in ("val", "test", "val_loss")},
                                  "killed_and_resumed": {k: b[k] for k in ("val", "test", "val_loss")},
                                  "table": table},
                       # eenet-train's own metrics: its configured thresholds, no split consulted
                       seeds=[args.seed], chosen_on={"thresholds": "fixed"}, source=__file__,
                       revision=started)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
