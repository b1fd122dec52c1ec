"""Core acceptance: resnet20 with 2 EENets exits on MNIST, against the plain resnet20.

EENets (Demir & Akbas): exits placed by the ``fine`` distribution, backbone and
exits trained jointly, one warm-up epoch of ``multi_ce`` then ``eenet_v2`` (the
two-stage schedule), for a sweep of lambda; the plain backbone (no exits) is
trained by the same recipe in the same Lightning loop (for a network without
exits both losses are the cross-entropy).

Two confidence heads are compared: EENets' own (a linear layer on the exit's
features, ``exit.confidence_input=features``) and eenet's ``stats`` head (a
linear layer on statistics of the exit's own prediction, started as h = max
softmax, with a 10x learning rate for its 4 parameters); see
``eenet/models/exits.py`` for why EENets' head saturates under Adam.
Reported on the MNIST test set (../shared/data), with the confidence policy at
threshold 0.5: test accuracy, average cost fraction (fvcore MACs, exit heads
included) and exit rates. Target: for some lambda, accuracy within 0.5 points
of the plain backbone at an average cost fraction of at most 0.5.

    python experiments/mnist_core/run.py          # full run (about 35 minutes on 2 cores)
    python experiments/mnist_core/run.py --smoke  # 1 epoch on a subset (JSON under runs/)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table
from eenet.config import compose_config
from eenet.io import atomic_write_text
from eenet.jobs.train import train

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"
RUNS = HERE.parent / "runs"  # experiments/runs/<study>/...


def run(name: str, overrides: list[str], args) -> dict:
    out = RUNS / ("mnist_core_smoke" if args.smoke else "mnist_core") / name
    done = out / "results.json"
    if done.is_file() and json.loads(done.read_text()).get("epochs") == args.epochs \
            and not args.retrain:
        print(f"reusing {out}")
        saved = json.loads(done.read_text())
        wall = out / "wall_s.json"  # the run's training time, beside eenet's own results.json
        return {"name": name, "overrides": overrides, "run_dir": str(out), "reused": True,
                "wall_s": json.loads(wall.read_text()) if wall.is_file() else float("nan"),
                "test": saved["test"],
                "val": saved["val"], "exits": saved["exits"], "epochs": args.epochs}
    base = ["dataset=mnist", f"data_root={args.data}", "backbone=resnet20", f"exit={args.exit}",
            "loss=two_stage", f"loss.first_epochs={args.warmup}", "optimizer=adam",
            "scheduler=cosine",
            f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
            "logger=csv", f"threads={args.threads}", f"seed={args.seed}"]
    if args.smoke:
        base += ["dataset.datamodule.train_subset=3000", "dataset.datamodule.val_size=500",
                 "dataset.datamodule.test_subset=1000"]
    t0 = time.time()
    results, _ = train(compose_config([*base, *overrides, "overwrite=true"], output_dir=out))
    wall = round(time.time() - t0, 1)
    atomic_write_text(out / "wall_s.json", json.dumps(wall) + "\n")
    return {"name": name, "overrides": overrides, "run_dir": str(out),
            "wall_s": wall, "test": results["test"], "val": results["val"],
            "exits": results["exits"], "epochs": args.epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--exit", default="plain", help="exit pre-block config (conf/exit)")
    p.add_argument("--warmup", type=int, default=1, help="multi_ce epochs before eenet_v2")
    p.add_argument("--heads", nargs="+", default=["stats", "features"])
    p.add_argument("--feature-lambdas", type=float, nargs="+", default=[0.25, 1.0],
                   help="lambdas for EENets' feature head (the comparison; all for the stats head)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--retrain", action="store_true", help="retrain runs that already finished")
    args = p.parse_args()
    started = git_revision(__file__)  # the code this run starts with (commits may land before it ends)

    plain = run("plain", ["placement.method=explicit", "placement.stages=[]"], args)
    ee = []
    for head in args.heads:
        lr_scale = 10 if head == "stats" else 1
        for lam in (args.lambdas if head == "stats" else args.feature_lambdas):
            r = run(f"{head}_lambda_{lam:g}",
                    ["placement.method=fine", "placement.num_exits=2",
                     f"exit.confidence_input={head}", f"confidence_lr_scale={lr_scale}",
                     f"loss.second.lambda_coef={lam}"], args)
            r.update(head=head, lambda_coef=lam, confidence_lr_scale=lr_scale)
            ee.append(r)

    base_acc = plain["test"]["accuracy"]
    rows = [["plain resnet20", "-", "-", f"{100 * base_acc:.2f}", "-", "1.000", "-", "-",
             f"{plain['wall_s']:.0f}"]]
    for r in ee:
        t = r["test"]
        r["accuracy_drop_points"] = 100 * (base_acc - t["accuracy"])
        r["meets_target"] = r["accuracy_drop_points"] <= 0.5 and t["avg_cost_fraction"] <= 0.5
        head = "EENets (features)" if r["head"] == "features" else "eenet stats"
        rows.append([f"resnet20 + 2 exits (fine, {args.exit})", head, f"{r['lambda_coef']:g}",
                     f"{100 * t['accuracy']:.2f}", f"{r['accuracy_drop_points']:+.2f}",
                     f"{t['avg_cost_fraction']:.3f}",
                     " / ".join(f"{100 * x:.1f}" for x in t["exit_rates"]),
                     f"{100 * t['mixture_acc']:.2f} @ {t['expected_cost']:.3f}",
                     f"{r['wall_s']:.0f}"])
    table = markdown_table(["model", "confidence head", "lambda", "test acc %", "drop (points)",
                            "avg cost fraction", "exit rates % (exit0/1/final)",
                            "mixture acc % @ E[C_0]", "wall s"], rows)
    met = [r["name"] for r in ee if r["meets_target"]]
    print(f"MNIST test set (n={plain['test']['n']}), {args.epochs} epochs ({args.warmup} of "
          f"multi_ce, then eenet_v2), confidence policy at threshold 0.5; cost fractions in "
          f"fvcore MACs (exit heads included)\n")
    print(table)
    print(f"\ntarget (drop <= 0.5 points at avg cost <= 0.5) met by: {met or 'none'}")
    out = RUNS / "mnist_core_smoke" / "results.json" if args.smoke else HERE / "results.json"
    path = save_report(str(out), {"plain": plain, "early_exit": ee, "table": table,
                                  "target_met_by": met, "settings": vars(args)},
                       seeds=[args.seed], source=__file__, revision=started,
                       # confidence threshold 0.5 for every run; every lambda and head reported
                       chosen_on={"thresholds": "fixed", "lambda": "every", "confidence head": "every"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
