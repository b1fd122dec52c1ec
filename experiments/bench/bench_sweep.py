"""Parallel local sweeps: a 3-job sweep with Hydra's joblib launcher against the same 3 jobs in sequence.

The jobs: resnet20 with 2 exits on the bundled digits, ``--epochs`` epochs,
seeds 0, 1, 2. Measured in the same run, alternating, ``--reps`` times: the
whole ``eenet-train -m`` command's wall time with the basic launcher (one job
after another, in one process) and with ``hydra/launcher=joblib`` (3 worker
processes). Each job uses 1 thread in both; the sequential sweep is also timed
with 2 threads per job, since a single job on this machine could use both cores.

    python experiments/bench/bench_sweep.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table

SEEDS = (0, 1, 2)  # the three jobs of the sweep


def sweep(launcher: list[str], threads: int, epochs: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="eenet-sweep-"))
    cmd = [sys.executable, "-m", "eenet.cli.train", "-m", f"seed={','.join(map(str, SEEDS))}",
           f"trainer.max_epochs={epochs}",
           "trainer.enable_progress_bar=false", "logger=none", "checkpoint.enabled=false",
           f"threads={threads}", *launcher, f"hydra.sweep.dir={out}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - t0
    assert all((out / str(i) / "results.json").is_file() for i in range(3))
    shutil.rmtree(out)
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    variants = {"sequential (basic launcher), 1 thread/job": ([], 1),
                "sequential (basic launcher), 2 threads/job": ([], 2),
                "joblib, 3 workers, 1 thread/job": (["hydra/launcher=joblib",
                                                     "hydra.launcher.n_jobs=3"], 1)}
    times = {k: [] for k in variants}
    for rep in range(args.reps):
        for name, (launcher, threads) in variants.items():
            times[name].append(sweep(launcher, threads, args.epochs))
            print(f"rep {rep}: {name}: {times[name][-1]:.1f} s", flush=True)
    joblib = statistics.median(times["joblib, 3 workers, 1 thread/job"])
    rows = [[k, f"{statistics.median(v):.1f}", " ".join(f"{x:.1f}" for x in v),
             f"{statistics.median(v) / joblib:.2f}"] for k, v in times.items()]
    table = markdown_table(["3-job sweep", "median wall s", "runs", "time / joblib time"], rows)
    print(f"\n3 jobs (digits, {args.epochs} epochs each), {os.cpu_count()} cores, median of "
          f"{args.reps}\n")
    print(table)
    faster = all(statistics.median(v) > joblib for k, v in times.items() if "joblib" not in k)
    print(f"\njoblib faster than every sequential variant: {faster}")
    path = save_report(__file__, {"times_s": times, "joblib_faster": faster, "table": table,
                                  "settings": vars(args)}, seeds=SEEDS)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
