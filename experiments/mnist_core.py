"""Core acceptance: resnet20 with 2 EENets exits on MNIST, against the plain resnet20.

EENets (Demir & Akbas): exits placed by the ``fine`` distribution, backbone and
exits trained jointly with ``eenet_v2`` for a sweep of lambda; the plain
backbone (no exits) is trained by the same recipe in the same Lightning loop.
Reported on the MNIST test set (../shared/data), with the confidence policy at
threshold 0.5: test accuracy, average cost fraction (fvcore MACs, exit heads
included) and exit rates. Target: for some lambda, accuracy within 0.5 points
of the plain backbone at an average cost fraction of at most 0.5.

    python experiments/mnist_core.py                 # full run (about 35 minutes on 2 cores)
    python experiments/mnist_core.py --smoke         # 1 epoch on a subset, a pipeline check
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from eenet.reporting import markdown_table, save_report
from eenet.train import compose_config, train

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def run(name: str, overrides: list[str], args) -> dict:
    out = HERE / "runs" / ("mnist_core_smoke" if args.smoke else "mnist_core") / name
    base = ["dataset=mnist", f"data_root={args.data}", "backbone=resnet20", f"exit={args.exit}",
            "loss=eenet_v2", "optimizer=adam", "scheduler=cosine",
            f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
            "logger=csv", "threads=2", f"seed={args.seed}"]
    if args.smoke:
        base += ["dataset.datamodule.train_subset=3000", "dataset.datamodule.val_size=500",
                 "dataset.datamodule.test_subset=1000"]
    t0 = time.time()
    results, _ = train(compose_config([*base, *overrides], output_dir=out))
    return {"name": name, "overrides": overrides, "run_dir": str(out),
            "wall_s": round(time.time() - t0, 1), "test": results["test"], "val": results["val"],
            "exits": results["exits"], "epochs": args.epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--exit", default="plain", help="exit pre-block config (conf/exit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    plain = run("plain", ["placement.method=explicit", "placement.stages=[]"], args)
    ee = [run(f"lambda_{lam:g}", ["placement.method=fine", "placement.num_exits=2",
                                  f"loss.lambda_coef={lam}"], args) for lam in args.lambdas]

    base_acc = plain["test"]["accuracy"]
    rows = [["plain resnet20", "-", 100 * base_acc, "-", 1.0, "-", f"{plain['wall_s']:.0f}"]]
    for lam, r in zip(args.lambdas, ee):
        t = r["test"]
        r["accuracy_drop_points"] = 100 * (base_acc - t["accuracy"])
        r["meets_target"] = r["accuracy_drop_points"] <= 0.5 and t["avg_cost_fraction"] <= 0.5
        rows.append([f"resnet20 + 2 exits (fine, {args.exit})", f"{lam:g}", 100 * t["accuracy"],
                     f"{r['accuracy_drop_points']:+.2f}", t["avg_cost_fraction"],
                     " / ".join(f"{100 * x:.1f}" for x in t["exit_rates"]), f"{r['wall_s']:.0f}"])
    table = markdown_table(["model", "lambda", "test acc %", "drop (points)",
                            "avg cost fraction", "exit rates % (exit0/1/final)", "wall s"], rows)
    met = [r["name"] for r in ee if r["meets_target"]]
    print(f"MNIST test set (n={plain['test']['n']}), {args.epochs} epochs, confidence policy "
          f"at threshold 0.5; cost fractions in fvcore MACs (exit heads included)\n")
    print(table)
    print(f"\ntarget (drop <= 0.5 points at avg cost <= 0.5) met by: {met or 'none'}")
    path = save_report(__file__, {"plain": plain, "early_exit": ee, "table": table,
                                  "target_met_by": met, "settings": vars(args)},
                       suffix="_smoke" if args.smoke else "")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
