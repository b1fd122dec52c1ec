"""Overhead of the walk over live values (issue 17): the split network against the unsplit one.

The staged resnet20 of ``experiments/runs/mnist_budget/ee`` (2 early exits) is run
through the mechanism every walker shares (``net.walk()``: steps over a tuple of live
values) by the dynamic engine with every threshold ``inf``: every sample goes to
the final exit, the idle exits' heads are skipped, so the split network computes what
the backbone computes, plus the walk's and the engine's bookkeeping (input checks,
the live tuple, the policy). The unsplit network is ``net.backbone`` called straight
through (stem, stages, classifier). Both run on the first MNIST test samples at
batch 256 and at batch 1, with 2 threads, timed alternately (plain, split, then split,
plain, ...) ``--reps`` times in the same process; the figure is the median of each.
A third line times the walk alone (every step's body, then the final head, without
the engine) to separate the two costs. The predictions of the split network are checked equal to the
backbone's before timing.

Targets (issue 17): split within 3 % of unsplit at batch 256 and 10 % at batch 1. The
machine is shared: the load average (``os.getloadavg``, as ``uptime`` prints it) is
recorded before and after. The machine's speed drifts between repetitions (all variants
together), so the verdict rests on the paired ratio split / unsplit of each repetition
(the two are timed back to back): the median ratio and its distribution-free confidence
interval (order statistics of the binomial(n, 1/2), ``median_ratio_interval``, about 95 %
for 15 repetitions). The target is met when the interval's upper end is within it,
missed when its lower end is beyond it; otherwise, or when the load exceeds the core
count, the JSON says the comparison cannot resolve the target, instead of a verdict.

glibc's allocator returns freed memory to the system between batches unless told not
to, which adds page faults that depend on the order of the runs; the script runs with
``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`` (it restarts
itself with them when they are not set, since glibc reads them at start-up).

    python experiments/bench/bench_graph_split.py
    python experiments/bench/bench_graph_split.py --reps 15 --samples-256 2048 --samples-1 300
    python experiments/bench/bench_graph_split.py --quick   # does it run? (no JSON, no figure)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from eenet.data.batching import make_loader
from eenet.errors import EENetError
from eenet.inference import DynamicEngine
from eenet.policies import create_policy
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.runs import load_run

HERE = Path(__file__).resolve().parent
RUN = HERE.parent / "runs" / "mnist_budget" / "ee"
TARGETS = {256: 0.03, 1: 0.10}  # split / unsplit - 1, at most
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def restart_with_malloc_env() -> None:
    """Restart this process with :data:`MALLOC_ENV` unless it has it (glibc reads it at
    start-up). Called after the command line is parsed, so ``--help`` never restarts
    (``tests/test_experiments.py`` runs every script's ``--help`` inside pytest)."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def timed(fn, batches) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            fn(x)
    return time.perf_counter() - t0


def batches_of(dataset, batch_size: int, n: int) -> list[torch.Tensor]:
    out, seen = [], 0
    for x, _ in make_loader(dataset, batch_size, shuffle=False):
        if seen >= n:
            break
        out.append(x[: n - seen].contiguous())
        seen += out[-1].shape[0]
    return out


def net_policy_name(run: str) -> str:
    """The run's own policy name (thresholds are all inf here, so only the name is used)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(run) / "config.yaml")
    return str(cfg.policy.name)


def static_walk_final(steps, x):
    """Every step's body and only the final head: the walk without the engine's bookkeeping."""
    live = (x,)
    for step in steps:
        live = step.body(live)
    return steps[-1].head(live)[0]


def median_ratio_interval(ratios: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The order statistics ``(x_(k), x_(n+1-k))`` that cover the median of ``ratios``'
    distribution with probability at least ``level`` (the sign-test interval: the count of
    values below the median is binomial(n, 1/2)), and their actual coverage. With too few
    values for ``level`` the widest interval (min, max) and its coverage are returned."""
    xs, n = sorted(ratios), len(ratios)
    k = 1
    while k + 1 <= n // 2 and 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n >= level:
        k += 1
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
    return xs[k - 1], xs[n - k], coverage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(RUN), help=f"an eenet-train run folder (default {RUN})")
    p.add_argument("--reps", type=int, default=15,
                   help="timed repetitions (median; at least 6 for a 95 %% interval)")
    p.add_argument("--samples-256", type=int, default=2048, help="test samples at batch 256")
    p.add_argument("--samples-1", type=int, default=300, help="test samples at batch 1")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--tag", default="", help="appended to the JSON's name")
    p.add_argument("--quick", action="store_true",
                   help="a check that the script runs: 2 repetitions of 256 and 8 samples, the "
                        "table printed, no JSON written (not a measurement)")
    args = p.parse_args()
    restart_with_malloc_env()
    if args.quick:
        args.reps, args.samples_256, args.samples_1 = 2, 256, 8
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    _, dm, net, cost = load_run(args.run)
    n_early = net.num_exits - 1
    policy = create_policy(net_policy_name(args.run), [math.inf] * n_early)
    engine = DynamicEngine(net, policy, cost)  # every exit idle: heads skipped
    plain = net.backbone.eval()
    steps = net.walk()

    def walk_only(x):
        return static_walk_final(steps, x)

    variants = {"unsplit": plain, "split (engine)": engine, "split (walk only)": walk_only}
    rows, results = [], []
    for bs, n in ((256, args.samples_256), (1, args.samples_1)):
        batches = batches_of(dm.test_dataset, bs, n)
        with torch.inference_mode():  # the split network computes what the backbone does
            for x in batches[:8] if bs == 1 else batches:
                out = engine(x)
                assert bool((out.exit == n_early).all()), "every threshold inf: final exit only"
                assert torch.equal(out.pred, plain(x).argmax(1)), "split and unsplit disagree"
        for fn in variants.values():  # warm-up
            timed(fn, batches[:3])
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.reps):  # interleaved, the order reversed every other repetition
            for k in (names if r % 2 == 0 else names[::-1]):
                times[k].append(timed(variants[k], batches))
        med = {k: statistics.median(v) for k, v in times.items()}
        spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
        overhead = med["split (engine)"] / med["unsplit"] - 1
        walk_overhead = med["split (walk only)"] / med["unsplit"] - 1
        ratios = [s / u for s, u in zip(times["split (engine)"], times["unsplit"])]
        per_rep = statistics.median(ratios)
        lo, hi, coverage = median_ratio_interval(ratios)
        target = TARGETS[bs]
        samples = sum(x.shape[0] for x in batches)
        results.append({"batch_size": bs, "samples": samples, "seconds": times, "median_s": med,
                        "relative_spread": spread, "overhead": overhead,
                        "overhead_per_rep_median": per_rep - 1,
                        "overhead_interval": [lo - 1, hi - 1], "interval_coverage": coverage,
                        "walk_only_overhead": walk_overhead,
                        "target": target, "within_target": hi - 1 <= target,
                        "outside_target": lo - 1 > target})
        rows.append([bs, samples, *(f"{1e3 * med[k] / samples:.3f}" for k in names),
                     f"{100 * (per_rep - 1):+.1f} [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]",
                     f"{100 * walk_overhead:+.1f}", f"<= {100 * target:.0f}",
                     " / ".join(f"{100 * spread[k]:.0f}" for k in names)])
        print(rows[-1], flush=True)
    load_after = os.getloadavg()

    cores = os.cpu_count() or 1
    verdicts = []
    for res in results:
        undecided = not (res["within_target"] or res["outside_target"])
        loaded = max(load_before[0], load_after[0]) > cores
        if loaded or undecided:
            why = []
            if loaded:
                why.append(f"load average {max(load_before[0], load_after[0]):.1f} on {cores} cores")
            if undecided:
                lo, hi = res["overhead_interval"]
                why.append(f"the {100 * res['interval_coverage']:.0f} % interval of the overhead, "
                           f"[{100 * lo:+.1f}, {100 * hi:+.1f}] %, straddles the "
                           f"{100 * res['target']:.0f} % target")
            res["meaningful"] = False
            res["verdict"] = ("not resolvable on this machine now (" + "; ".join(why) + "): the "
                              "figure measures the other processes as much as the code")
        else:
            res["meaningful"] = True
            res["verdict"] = "within target" if res["within_target"] else "outside target"
        verdicts.append(f"batch {res['batch_size']}: {res['verdict']}")

    table = markdown_table(["batch", "samples", "unsplit ms/sample", "split engine ms/sample",
                            "walk only ms/sample", "overhead % (median of paired ratios [interval])",
                            "walk only %", "target %",
                            "spread % (u / e / w)"], rows)
    load = (f"load average {' '.join(f'{v:.2f}' for v in load_before)} before, "
            f"{' '.join(f'{v:.2f}' for v in load_after)} after ({cores} cores)")
    print(f"\nstaged resnet20 ({args.run}), every threshold inf, vs net.backbone; "
          f"{torch.get_num_threads()} threads, {args.reps} interleaved repetitions (overhead: median "
          f"of the paired ratios, with its distribution-free interval); {load}\n")
    print(table)
    print("\n" + "\n".join(verdicts))
    if args.quick:
        print("--quick: no JSON written")
        return
    path = save_report(__file__, {"run": args.run, "settings": vars(args),
                                  "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
                                  "load_average_before": list(load_before),
                                  "load_average_after": list(load_after),
                                  "results": results, "table": table, "verdicts": verdicts},
                       suffix=args.tag)
    print(f"saved {path}")


if __name__ == "__main__":
    try:
        main()
    except EENetError as exc:  # e.g. a run folder that is not there: one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
