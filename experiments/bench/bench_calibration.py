"""Calibration speed: threshold settings evaluated per second on cached exit outputs.

Target (thresholds issue): at least 1,000 threshold settings over 10,000 cached
samples in under a second on CPU. The cached outputs are synthetic (logits and
confidence logits of N early exits plus the final exit, 10 classes), which is
all the evaluation sees; the timed call is ``Calibrator.evaluate`` on a (T, N)
batch of threshold vectors, median of ``--reps`` runs, 2 threads. A whole
``calibrate(tolerance=...)`` call (sweep, search and Pareto front) is timed too.

    python experiments/bench/bench_calibration.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from eenet.calibration import CachedExits, Calibrator
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table


def synthetic(n_exits: int, samples: int, classes: int = 10, seed: int = 0) -> CachedExits:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (samples,), generator=g)
    logits, conf = [], []
    for i in range(n_exits):
        lg = torch.randn(samples, classes, generator=g)
        lg[torch.arange(samples), y] += (1 + i) * torch.rand(samples, generator=g) * 3
        logits.append(lg)
        conf.append(torch.randn(samples, generator=g))
    conf[-1] = torch.full((samples,), math.inf)
    return CachedExits(logits, conf, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--settings", type=int, default=1_000)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows, results = [], []
    for n_exits in (3, 5):
        cached = synthetic(n_exits, args.samples)
        costs = [(i + 1) / n_exits for i in range(n_exits)]
        for policy in ("confidence", "max_prob", "entropy"):
            cal = Calibrator(cached, policy, costs)
            g = torch.Generator().manual_seed(1)
            picks = [c[torch.randint(0, len(c), (args.settings,), generator=g)] for c in cal.candidates]
            vecs = torch.stack(picks, 1)
            cal.evaluate(vecs)  # warm-up
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                cal.evaluate(vecs)
                times.append(time.perf_counter() - t0)
            full = []
            for _ in range(3):
                t0 = time.perf_counter()
                cal.calibrate(tolerance=1.0)
                full.append(time.perf_counter() - t0)
            med = statistics.median(times)
            r = {"exits": n_exits, "policy": policy, "settings": args.settings,
                 "samples": args.samples, "evaluate_s": times, "median_s": med,
                 "settings_per_s": args.settings / med, "calibrate_s": full,
                 "calibrate_median_s": statistics.median(full)}
            results.append(r)
            rows.append([n_exits, policy, f"{1e3 * med:.1f}", f"{args.settings / med:,.0f}",
                         f"{statistics.median(full):.2f}", "yes" if med < 1.0 else "NO"])
    table = markdown_table(["exits (incl. final)", "policy", f"ms for {args.settings} settings",
                            "settings / s", "full calibrate() s", "< 1 s"], rows)
    print(f"Calibration on {args.samples:,} cached samples, {torch.get_num_threads()} threads, "
          f"median of {args.reps}\n")
    print(table)
    path = save_report(__file__, {"results": results, "table": table, "settings": vars(args)},
                       seeds=[0, 1])  # synthetic scores: seed 0; threshold vectors drawn: seed 1
    print(f"saved {path}")


if __name__ == "__main__":
    main()
