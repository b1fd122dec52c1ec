"""Thresholds for an accuracy tolerance on MNIST: calibrated on val, evaluated on test.

resnet20 with 2 exits (EENets' ``fine`` placement, ``plain`` exit pre-blocks) is
trained on MNIST (../shared/data) for 5 epochs; since thresholds are chosen
after training, every exit is trained fully (``--loss multi_ce``, BranchyNet's
loss; any Core loss can be given). For each exit policy, thresholds are
calibrated on the validation split for a tolerance of 0.3 accuracy points
below the model's own final exit (``--reference final``, the default) or below
the validation accuracy of the backbone without exits (``--reference plain``,
what the target compares against); the policy with the lowest validation cost
that meets the tolerance is chosen (on val), and only that one is evaluated on
test, with the dynamic engine. The reference is the same resnet20 trained
without exits by the same recipe (reused from ``experiments/mnist_core/run.py``
when present).

Target: test accuracy within 0.3 points of the plain backbone at an average
cost fraction of at most 0.25. The whole validation Pareto curve is saved as
JSON (``results.json``) and PNG (``results.png``) beside this script; the
variants write ``results_pool.*`` (``--exit pool``) and ``results_vs_plain.*``
(``--reference plain``), every setting recorded in the JSON (``settings``).

    python experiments/mnist_budget/run.py
    python experiments/mnist_budget/run.py --reference plain  # reuses the runs
    python experiments/mnist_budget/run.py --exit pool  # pooled heads: runs/mnist_budget/ee_pool
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from eenet.jobs.evaluate import evaluate
from eenet.runs import load_run
from eenet.calibration import Calibrator, cache_exit_outputs
from eenet.data.batching import make_loader
from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table
from eenet.config import compose_config
from eenet.jobs.train import train

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"
RUNS = HERE.parent / "runs"  # experiments/runs/<study>/..., shared with bench/bench_inference.py
POLICIES = ("confidence", "max_prob", "entropy", "patience")


def train_run(name: str, overrides: list[str], args) -> Path:
    out = RUNS / "mnist_budget" / name
    if (out / "model.pt").is_file() and not args.retrain:
        print(f"reusing {out}")
        return out
    base = ["dataset=mnist", f"data_root={args.data}", "backbone=resnet20",
            "optimizer=adam", "scheduler=cosine", f"trainer.max_epochs={args.epochs}",
            "trainer.enable_progress_bar=false", "logger=csv", f"threads={args.threads}", f"seed={args.seed}"]
    # not reused (absent, unfinished or --retrain): replaced (eenet refuses otherwise)
    train(compose_config([*base, *overrides, "overwrite=true"], output_dir=out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--loss", default="multi_ce")
    p.add_argument("--tolerance", type=float, default=0.3)
    p.add_argument("--reference", choices=["final", "plain"], default="final",
                   help="tolerance below the model's own final exit on val, or below the "
                        "val accuracy of the backbone without exits")
    p.add_argument("--exit", default="plain", help="exit config (conf/exit): plain (EENets' "
                   "flattened features) or pool (global average pooling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    started = git_revision(__file__)  # the code this run starts with (commits may land before it ends)
    tag = "" if args.exit == "plain" else f"_{args.exit}"

    core_plain = RUNS / "mnist_core" / "plain"
    if (core_plain / "model.pt").is_file() and json.loads(
            (core_plain / "results.json").read_text())["epochs"] == args.epochs:
        plain_dir = core_plain
    else:
        plain_dir = train_run("plain", ["exit=plain", "placement.method=explicit",
                                        "placement.stages=[]", "loss=eenet_v2"], args)
    ee_dir = train_run(f"ee{tag}", [f"exit={args.exit}", "exit.confidence_input=stats",
                                    "placement.method=fine",
                                    "placement.num_exits=2", f"loss={args.loss}"], args)
    plain = json.loads((plain_dir / "results.json").read_text())
    plain_acc = plain["test"]["accuracy"]
    if args.reference == "plain":  # both on val: the test split is never looked at here
        target = {"min_accuracy": plain["val"]["accuracy"] - args.tolerance / 100}
    else:
        target = {"tolerance": args.tolerance}
    ref = "_vs_plain" if args.reference == "plain" else ""
    suffix = tag + ref

    # choose the policy on val only
    _, dm, net, cost = load_run(ee_dir)
    val = cache_exit_outputs(net, make_loader(dm.val_dataset, 512, shuffle=False))
    per_policy = {}
    for policy in POLICIES:
        res = Calibrator(val, policy, cost).calibrate(**target)
        per_policy[policy] = res
        print(f"val, {policy}: {res.message}")
    ok = {k: r for k, r in per_policy.items() if r.reachable}
    best = min(ok, key=lambda k: ok[k].chosen.avg_cost)

    out = ee_dir / f"eval_budget{ref}"
    (key, value), = target.items()
    results = evaluate(compose_config([f"run={ee_dir}", f"{key}={value}",
                                       f"policy={best}", "latency=false", "overwrite=true"],
                                      output_dir=out, config_name="eval"))
    png = HERE / f"results{suffix}.png"
    shutil.copy(out / "curve.png", png)
    t = results["test"]
    drop = 100 * (plain_acc - t["accuracy"])
    meets = drop <= args.tolerance and t["avg_cost_fraction"] <= 0.25
    rows = [["plain resnet20 (no exits)", "-", "-", f"{100 * plain_acc:.2f}", "-", "1.000", "-"]]
    print(f"exit heads: {args.exit}")
    for k, r in per_policy.items():
        rows.append([f"resnet20 + 2 exits, {k}", f"{100 * r.chosen.accuracy:.2f}",
                     f"{r.chosen.avg_cost:.4f}",
                     f"{100 * t['accuracy']:.2f}" if k == best else "(not run on test)",
                     f"{drop:+.2f}" if k == best else "",
                     f"{t['avg_cost_fraction']:.4f}" if k == best else "",
                     " / ".join(f"{100 * x:.1f}" for x in t["exit_rates"]) if k == best else ""])
    table = markdown_table(["model / policy", "val acc %", "val cost", "test acc %",
                            "drop vs plain (points)", "test avg cost", "test exit rates %"], rows)
    print(f"\nMNIST, {args.epochs} epochs, tolerance {args.tolerance} points below the "
          f"{'backbone without exits' if args.reference == 'plain' else 'own final exit'} calibrated on val; "
          f"policy chosen on val: {best}; test with the dynamic engine\n")
    print(table)
    print(f"\ntarget (drop <= {args.tolerance} points vs plain, avg cost <= 0.25): "
          f"{'met' if meets else 'NOT met'}")
    path = save_report(str(HERE / "results.json"), {  # results<suffix>.json here
        "plain_run": str(plain_dir), "ee_run": str(ee_dir), "plain_test_accuracy": plain_acc,
        "chosen_policy": best, "test": t, "drop_points": drop, "meets_target": meets,
        "val_calibration": {k: r.to_dict() for k, r in per_policy.items()},
        "eval_results": str(out / "results.json"), "exits": results["exits"],
        "calibration_target": target, "table": table, "settings": vars(args)}, suffix=suffix,
        seeds=[args.seed], chosen_on={"thresholds": "val", "policy": "val"}, source=__file__,
        revision=started)
    print(f"saved {path} and {png}")


if __name__ == "__main__":
    main()
