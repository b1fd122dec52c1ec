"""Per-exit temperature scaling on trained runs: fitted on val, ECE and cost at a tolerance on test.

For each run folder given (written by ``eenet-train``; no training here), one
static pass caches every exit's outputs on the validation and test splits.
One temperature per exit is fitted on val by NLL (Guo et al., "On Calibration
of Modern Neural Networks", ICML 2017; ``eenet.calibration.temperature``), and
the script reports:

- the per-exit temperatures, and the per-exit expected calibration error
  (15 equal-width bins of the max softmax probability) on test before and
  after scaling, with their sum (the issue's acceptance: the summed ECE on the
  CIFAR-10 (JPEG) model's test split goes down), and the same on val (the
  fitting data);
- the cost at an accuracy tolerance (default 1 point below the final exit; several
  can be given):
  thresholds chosen on val with :class:`eenet.calibration.Calibrator` (policy
  ``max_prob`` by default), on the raw and on the temperature-scaled outputs,
  and evaluated on test (accuracy, drop against the final exit on test,
  average cost fraction: fvcore MACs over the plain backbone, idle heads not
  paid for).

A reliability diagram per run is saved beside this script
(``reliability_<run>.png``) and everything in ``results<suffix>.json``.

    python experiments/temperature/run.py experiments/runs/mnist_budget/ee
    python experiments/temperature/run.py experiments/runs/mnist_budget/ee experiments/runs/cifar10_sdn_15ep
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from eenet.calibration import Calibrator, cache_exit_outputs
from eenet.calibration.temperature import (ECE_BINS, apply_temperatures, exit_reliability, fit_temperatures,
                                           temperature_report)
from eenet.data.batching import make_loader
from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table
from eenet.reporting.plots import plot_reliability
from eenet.runs import load_run

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs"


def run_tag(run: Path) -> str:
    """A short name for a run folder: its path below experiments/runs, '/' -> '_'."""
    run = run.resolve()
    try:
        return "_".join(run.relative_to(RUNS).parts)
    except ValueError:
        return run.name


def at_tolerance(val, test, policy: str, cost, tolerance: float) -> dict:
    """Thresholds for ``tolerance`` chosen on val, and what they give on test."""
    t0 = time.perf_counter()
    res = Calibrator(val, policy, cost).calibrate(tolerance=tolerance)
    search_s = time.perf_counter() - t0
    on_test = Calibrator(test, policy, cost)
    point = on_test.point(on_test.score_vector(res.chosen.thresholds))
    final = float(test.correct[:, -1].double().mean())
    return {"val": res.chosen.to_dict(), "val_reachable": res.reachable, "val_message": res.message,
            "test": point.to_dict(), "test_final_exit_accuracy": final,
            "test_drop_points": 100 * (final - point.accuracy), "search_s": search_s}


def study(run: Path, args) -> dict:
    t0 = time.perf_counter()
    _, dm, net, cost = load_run(run, args.data)
    val = cache_exit_outputs(net, make_loader(dm.val_dataset, 512, shuffle=False))
    test = cache_exit_outputs(net, make_loader(dm.test_dataset, 512, shuffle=False))
    cache_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = fit_temperatures(val)
    fit_s = time.perf_counter() - t0
    val_t = apply_temperatures(val, fit.temperatures)
    test_t = apply_temperatures(test, fit.temperatures)
    names = [f"exit {i}" for i in range(len(test.logits) - 1)] + ["final"]
    diagrams = {"before": [exit_reliability(lg, test.targets, args.bins) for lg in test.logits],
                "after": [exit_reliability(lg, test_t.targets, args.bins) for lg in test_t.logits]}
    png = plot_reliability(HERE / f"reliability_{run_tag(run)}.png", diagrams, names,
                           f"{run_tag(run)}: test split, T fitted on val")
    policies = {}  # tolerance (as given) -> policy -> before / after
    for tol in args.tolerance:
        policies[f"{tol:g}"] = {policy: {"before": at_tolerance(val, test, policy, cost, tol),
                                         "after": at_tolerance(val_t, test_t, policy, cost, tol)}
                                for policy in args.policy}
    return {"run": str(run), "exits": names, "samples": {"val": len(val), "test": len(test)},
            "test": temperature_report(fit, test, args.bins),
            "val": temperature_report(fit, val, args.bins),
            "reliability_test": diagrams, "reliability_png": str(png),
            "at_tolerance": policies,
            "timing_s": {"cache_val_test": cache_s, "fit": fit_s}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders written by eenet-train")
    p.add_argument("--tolerance", type=float, nargs="+", default=[1.0],
                   help="accuracy points below the final exit (one or more)")
    p.add_argument("--policy", nargs="+", default=["max_prob"], choices=["max_prob", "entropy"])
    p.add_argument("--bins", type=int, default=ECE_BINS, help="ECE bins (Guo et al.: 15)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data", default=None, help="data root, if the data moved since training")
    p.add_argument("--suffix", default="", help="added to results.json's stem")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = git_revision(__file__)  # the code this run starts with (commits may land before it ends)

    per_run = {}
    ece_rows, cost_rows = [], []
    for run in args.runs:
        tag = run_tag(run)
        r = per_run[tag] = study(run, args)
        te, va = r["test"], r["val"]
        for i, name in enumerate(r["exits"]):
            ece_rows.append([tag, name, f"{te['fit']['temperatures'][i]:.3f}",
                             f"{100 * va['ece_before'][i]:.2f}", f"{100 * va['ece_after'][i]:.2f}",
                             f"{100 * te['ece_before'][i]:.2f}", f"{100 * te['ece_after'][i]:.2f}"])
        ece_rows.append([tag, "**sum**", "", f"{100 * va['ece_sum_before']:.2f}",
                         f"{100 * va['ece_sum_after']:.2f}", f"**{100 * te['ece_sum_before']:.2f}**",
                         f"**{100 * te['ece_sum_after']:.2f}**"])
        for tol, per_policy in r["at_tolerance"].items():
            for policy, both in per_policy.items():
                for when, q in both.items():
                    cost_rows.append([tag, tol, policy, when, f"{100 * q['val']['accuracy']:.2f}",
                                      f"{q['val']['avg_cost']:.4f}", f"{100 * q['test']['accuracy']:.2f}",
                                      f"{q['test_drop_points']:+.2f}", f"{q['test']['avg_cost']:.4f}",
                                      " / ".join(f"{100 * x:.1f}" for x in q["test"]["exit_rates"])])
        print(f"{tag}: T = {[round(t, 3) for t in te['fit']['temperatures']]}, summed test ECE "
              f"{100 * te['ece_sum_before']:.2f}% -> {100 * te['ece_sum_after']:.2f}%")
    ece_table = markdown_table(["run", "exit", "T (val NLL)", "val ECE % before", "val ECE % after",
                                "test ECE % before", "test ECE % after"], ece_rows)
    cost_table = markdown_table(["run", "tolerance (points)", "policy", "temperature", "val acc %", "val cost",
                                 "test acc %", "test drop (points)", "test cost", "test exit rates %"], cost_rows)
    print(f"\nPer-exit ECE ({args.bins} bins), temperatures fitted on val by NLL\n")
    print(ece_table)
    print("\nThresholds for an accuracy tolerance below the final exit, chosen on val, evaluated on "
          "test (drop against the final exit on test)\n")
    print(cost_table)
    path = save_report(str(HERE / "results.json"), {
        "runs": per_run, "ece_table": ece_table, "cost_table": cost_table, "settings": {
            **{k: v for k, v in vars(args).items() if k != "runs"},
            "runs": [str(r) for r in args.runs]}},
        suffix=args.suffix, revision=started,
        chosen_on={"temperatures": "val", "thresholds": "val"})
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
