"""How long one certified calibration takes: each method on 10,000 cached samples, median of 5.

Target (issue 18): one calibration of 10,000 samples with any method in under
2 seconds on the 2-core machine. The timed call is the whole
:func:`eenet.calibration.certify` (scores and candidates, the losses, the path
on the ordering part, the p-values or CRC on the testing part, the chosen
point), without the baseline searches; those (the uncorrected search and its
5-fold optimism correction, ``empirical_search``) are timed beside it. The
samples are 10,000 drawn without replacement from a run's pooled val + test
exit outputs (cached by ``run.py``), risk ``drop``, alpha 1 point, delta 0.1.

    python experiments/guarantee/bench.py                  # 2 threads
    python experiments/guarantee/bench.py --threads 1 --out _1thread
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from eenet.calibration import CachedExits, Calibrator, certify
from eenet.calibration.guarantee import empirical_search
from eenet.calibration.risk import exit_losses
from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table

# experiments/guarantee/run.py, beside this script, loaded by its path (whatever the working folder)
_spec = importlib.util.spec_from_file_location("guarantee_run", Path(__file__).resolve().with_name("run.py"))
_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_run)
RUNS, population = _run.RUNS, _run.population

HERE = Path(__file__).resolve().parent


def timed(call, reps: int) -> list[float]:
    call()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", type=Path,
                   default=[RUNS / "mnist_budget" / "ee", RUNS / "cifar10_sdn_15ep"])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policy", default="max_prob")
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = git_revision(__file__)
    rows, results = [], []
    for run_dir in args.runs:
        pop, cost, info = population(run_dir)
        idx = torch.randperm(len(pop), generator=torch.Generator().manual_seed(0))[:args.samples]
        cached = CachedExits([x[idx] for x in pop.logits], [x[idx] for x in pop.conf_logits],
                             pop.targets[idx])
        calls = {m: (lambda m=m: certify(cached, args.policy, cost, method=m, risk="drop",
                                         alpha=args.alpha, delta=args.delta, baselines=False))
                 for m in ("ltt", "ucb", "crc")}

        def search(folds: int):
            cal = Calibrator(cached, args.policy, cost)
            return empirical_search(cal, exit_losses(cached, "drop"), args.alpha, folds)

        calls["empirical"] = lambda: search(0)
        calls["optimism (5 folds)"] = lambda: search(5)
        for name, call in calls.items():
            times = timed(call, args.reps)
            med = statistics.median(times)
            res = call()
            cost_pt = res.chosen.avg_cost if hasattr(res, "chosen") else res["avg_cost"]
            results.append({"run": info["run"], "method": name, "samples": len(cached),
                            "times_s": times, "median_s": med, "avg_cost": cost_pt})
            rows.append([Path(info["run"]).name, name, len(cached), f"{med:.3f}",
                         f"{min(times):.3f} - {max(times):.3f}", f"{cost_pt:.4f}"])
            print(f"{Path(info['run']).name} {name}: median {med:.3f} s", flush=True)
    table = markdown_table(["model", "method", "samples", "median s", "range s", "avg cost (cal)"], rows)
    print(f"\n{args.threads} torch thread(s), median of {args.reps} after one warm-up\n")
    print(table)
    path = save_report(str(HERE / "bench.json"), {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results, "table": table,
        "target": "one calibration of 10,000 samples with any method in under 2 s"},
        suffix=args.out, revision=started, seeds={"sample": 0}, chosen_on=None)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
