"""PTEENet on CIFAR-10 (JPEG): exits post-trained on a frozen resnet20, a lambda sweep.

Lahiany & Aperstein, "PTEENet: Post-Trained Early-Exit Neural Networks
Augmentation for Inference Cost Optimization", IEEE Access 2022.

1. resnet20 without exits is trained on CIFAR-10 (JPEG) (Adam, or SGD with
   ``--backbone-optimizer sgd``; cosine, crop + flip); its test accuracy and
   epochs are recorded.
2. PTEENet branches (2 x [3x3 conv, BN, ReLU], pooling, confidence and
   classifier heads; ``conf/exit/pteenet.yaml``) are attached after the stages
   chosen by EENets' ``linear`` distribution (3 exits, ``--num-exits``) and
   post-trained on the frozen backbone (``mode=posttrain``): one epoch of
   multi_ce, then eenet_v2 with lambda in the sweep. The backbone's state hash
   is printed before and after; the final exit is the backbone's own classifier.
3. For every lambda, thresholds (confidence heads; ``--policies``) are
   calibrated on the validation split for a tolerance of 1 point below the
   final exit (= the backbone) and evaluated on test with the dynamic engine
   (``eenet-eval``). One lambda is also chosen without the test set: the one
   whose calibrated point costs least on val (``chosen_on_val`` in the JSON).
   ``--optimism-folds 5`` tightens the tolerance by a 5-fold estimate, on val,
   of how optimistic the search over per-exit thresholds is, averaged over 4
   shuffles (``--optimism-repeats``; see ``eenet/inference/calibration.py``);
   the JSON name then ends in ``_cv5x4``.
   Each drop comes with its paired standard error (``drop_vs_final_exit``):
   on 10,000 test images a drop near the 1-point target is uncertain by a
   few tenths of a point. An exit whose threshold comes out as ``inf`` releases no
   sample and its branch is not run (nor charged), so the calibration also
   chooses which branches to keep.
4. One epoch of joint training of the same network (``mode=mixed``: backbone and
   branches train) is timed against the post-training epochs, in the same run.

Targets: test accuracy within 1 point of the backbone at an average cost
fraction of at most 0.6; backbone hash unchanged; post-training epochs at least
2x faster than a joint-training epoch.

    python experiments/pteenet_cifar10.py
    python experiments/pteenet_cifar10.py --branch-convs 1   # cheaper branches: pteenet_cifar10_c1.json
    python experiments/pteenet_cifar10.py --backbone-optimizer sgd --branch-convs 1 --num-exits 6

Options beyond PTEENet: ``--branch-stride 2 --branch-growth 2`` (downsampling
branches), ``--targets backbone`` (branches learn the backbone's predictions),
``--loss multi_ce`` (per-exit cross-entropy throughout instead of the lambda
sweep), ``--loss eenet_v2_ce`` (the lambda sweep with eenet_v2 plus per-exit
cross-entropy, ``conf/loss/eenet_v2_ce.yaml``), ``--loss eenet_v2_kd`` (the
same plus self-distillation from the backbone at temperature 4, Phuong &
Lampert 2019, ``conf/loss/eenet_v2_kd.yaml``), ``--policies confidence
max_prob`` (each calibrated on val; the one with the lower val cost is
reported, all are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from eenet.jobs.evaluate import evaluate
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.config import compose_config
from eenet.jobs.train import train

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
RUNS = HERE / "runs" / "pteenet_cifar10"
# --loss: (tag in run and JSON names, loss overrides, config key of lambda or None: no sweep)
LOSSES = {"two_stage": ("", ["loss=two_stage", "loss.first_epochs=1"], "loss.second.lambda_coef"),
          "multi_ce": ("_multice", ["loss=multi_ce"], None),
          "eenet_v2_ce": ("_eenetce", ["loss=eenet_v2_ce"], "loss.terms.eenet.lambda_coef"),
          "eenet_v2_kd": ("_eenetkd", ["loss=eenet_v2_kd"], "loss.terms.eenet.lambda_coef")}


def run(name: str, overrides: list[str], args, force: bool = False, seed: int | None = None
        ) -> dict:
    out = RUNS / name
    if (out / "results.json").is_file() and not (args.retrain or force):
        print(f"reusing {out}", flush=True)
        return json.loads((out / "results.json").read_text())
    base = ["dataset=cifar10_jpeg", f"data_root={args.data}", "backbone=resnet20",
            "trainer.enable_progress_bar=false", "logger=csv", f"threads={args.threads}",
            f"seed={args.seed if seed is None else seed}"]
    t0 = time.time()
    results, _ = train(compose_config([*base, *overrides], output_dir=out))
    results["wall_s"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--backbone-epochs", type=int, default=30)
    p.add_argument("--post-epochs", type=int, default=8)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--tolerance", type=float, default=1.0)
    p.add_argument("--optimism-folds", type=int, default=0,
                   help="K >= 2: tighten the tolerance by the K-fold estimate of the threshold "
                        "search's optimism on val (eenet-eval optimism_folds=K)")
    p.add_argument("--optimism-repeats", type=int, default=4,
                   help="shuffles averaged in that estimate (repeated K-fold)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the branches (initialisation, data order); the backbone is "
                        "always the seed-0 one, so seeds measure the branches' spread")
    p.add_argument("--branch-convs", type=int, default=2,
                   help="[3x3 conv, BN, ReLU] layers per branch (PTEENet: 2)")
    p.add_argument("--branch-width", type=int, default=None,
                   help="channels of the branch convolutions (default: the stage's)")
    p.add_argument("--num-exits", type=int, default=3,
                   help="branches, placed by EENets' linear distribution of MACs")
    p.add_argument("--exit-stages", type=int, nargs="+", default=None,
                   help="explicit stages for the branches (instead of --num-exits, linear)")
    p.add_argument("--backbone-optimizer", choices=["adam", "sgd"], default="adam",
                   help="conf/optimizer for the backbone (sgd: lr 0.1, Nesterov, wd 5e-4)")
    p.add_argument("--branch-stride", type=int, default=1,
                   help="stride of the branch convolutions (2: downsampling branches)")
    p.add_argument("--branch-growth", type=float, default=1.0,
                   help="channel multiplier per branch conv after the first")
    p.add_argument("--targets", choices=["labels", "backbone"], default="labels",
                   help="train the branches on the labels or on the backbone's predictions")
    p.add_argument("--policies", nargs="+", default=["confidence"],
                   choices=["confidence", "max_prob", "entropy"],
                   help="exit policies to calibrate; the one with the lowest val cost is reported")
    p.add_argument("--loss", choices=list(LOSSES), default="two_stage",
                   help="two_stage: one epoch of multi_ce, then eenet_v2 with each lambda; "
                        "multi_ce: per-exit cross-entropy throughout (one run, no lambda); "
                        "eenet_v2_ce: eenet_v2 with each lambda plus per-exit cross-entropy")
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    loss_tag, loss_overrides, lam_key = LOSSES[args.loss]
    multi = lam_key is None  # one run without lambda

    # run folders name what they depend on, so that a run with other settings is not reused
    bb_tag = f"{args.backbone_epochs}ep" + ("" if args.backbone_optimizer == "adam" else "_sgd")
    bb_name = f"backbone_{bb_tag}"
    br = (f"c{args.branch_convs}" + (f"w{args.branch_width}" if args.branch_width else "")
          + (f"s{args.branch_stride}" if args.branch_stride != 1 else "")
          + (f"g{args.branch_growth:g}" if args.branch_growth != 1 else "")
          + (f"e{args.num_exits}" if args.num_exits != 3 and not args.exit_stages else "")
          + ("_at" + "-".join(map(str, args.exit_stages)) if args.exit_stages else "")
          + ("_distill" if args.targets == "backbone" else "")
          + loss_tag)
    seed_tag = "" if args.seed == 0 else f"_seed{args.seed}"
    cv_tag = (f"_cv{args.optimism_folds}x{args.optimism_repeats}" if args.optimism_folds else "")
    post_name = (f"post_{bb_tag}_{br}_{args.post_epochs}ep" + seed_tag
                 + ("" if multi else "_lambda_{lam:g}"))
    # the JSON beside this script: pteenet_cifar10.json for the defaults, else named by settings
    suffix = (("" if br == "c2" else f"_{br}")
              + ("" if args.post_epochs == 8 else f"_post{args.post_epochs}ep")
              + ("" if bb_tag == "30ep" else f"_{bb_tag}") + seed_tag + cv_tag)
    plain = run(bb_name, ["placement.method=explicit", "placement.stages=[]", "loss=multi_ce",
                             f"optimizer={args.backbone_optimizer}",
                             f"trainer.max_epochs={args.backbone_epochs}"], args, seed=0)
    backbone_acc = plain["exits"][-1]["test_accuracy"]
    branches = ["exit=pteenet", f"exit.convs={args.branch_convs}",
                f"exit.width={args.branch_width if args.branch_width else 'null'}",
                f"exit.stride={args.branch_stride}", f"exit.width_growth={args.branch_growth}",
                f"targets={args.targets}",
                *(["placement.method=explicit",
                   f"placement.stages=[{','.join(map(str, args.exit_stages))}]"]
                  if args.exit_stages else
                  ["placement.method=linear", f"placement.num_exits={args.num_exits}"]),
                f"backbone.checkpoint={RUNS / bb_name}"]
    branches += loss_overrides

    def lam_overrides(lam) -> list[str]:
        return [] if multi else [f"{lam_key}={lam}"]

    rows, sweep = [], []
    for lam in ([None] if multi else args.lambdas):
        name = post_name.format(lam=lam)
        r = run(name, branches + [
            "mode=posttrain", *lam_overrides(lam),
            f"trainer.max_epochs={args.post_epochs}"], args)
        # each policy calibrated on val; the cheapest on val (its chosen point) is reported
        evs = {}
        for policy in args.policies:
            folder = ("eval" if policy == "confidence" else f"eval_{policy}") + cv_tag
            evs[policy] = evaluate(compose_config(
                [f"run={RUNS / name}", f"tolerance={args.tolerance}", f"policy={policy}",
                 f"optimism_folds={args.optimism_folds}",
                 f"optimism_repeats={args.optimism_repeats}"],
                output_dir=RUNS / name / folder, config_name="eval"))
        val_cost = {k: v["calibration"]["chosen"]["avg_cost"] for k, v in evs.items()}
        policy = min(args.policies, key=lambda k: val_cost[k])
        ev = evs[policy]
        t = ev["test"]
        drop = 100 * (backbone_acc - t["accuracy"])
        entry = {"lambda": lam, "policy": policy, "val_cost_by_policy": val_cost,
                 "val_accuracy": ev["val"]["accuracy"], "val_cost": val_cost[policy],
                 "val_tolerance_met": bool(ev["calibration"]["reachable"]),
                 # drops against the final exit on the same samples, with paired standard errors
                 "drop_vs_final_exit": ev["drop_vs_final_exit"],
                 "test_by_policy": {k: {"accuracy": v["test"]["accuracy"],
                                        "avg_cost": v["test"]["avg_cost_fraction"]}
                                    for k, v in evs.items()},
                 "test_accuracy": t["accuracy"], "avg_cost": t["avg_cost_fraction"],
                 "exit_rates": t["exit_rates"], "drop_points": drop,
                 "meets_target": drop <= args.tolerance and t["avg_cost_fraction"] <= 0.6,
                 "thresholds": ev["policy"]["thresholds"],
                 "backbone_hash_before": r["backbone_hash_before"],
                 "backbone_hash_after": r["backbone_hash_after"],
                 "hash_unchanged": r["backbone_hash_before"] == r["backbone_hash_after"],
                 "exit_stages": [e["stage"] for e in r["exits"]],
                 "exit_test_accuracy": [e["test_accuracy"] for e in r["exits"]],
                 "post_epoch_seconds": r["train_epoch_seconds"],
                 "calibration_message": ev["calibration"]["message"],
                 "optimism": ev["calibration"]["target"].get("optimism")}
        sweep.append(entry)
        print(f"lambda {lam}: backbone hash {r['backbone_hash_before'][:16]}... -> "
              f"{r['backbone_hash_after'][:16]}... ({'unchanged' if entry['hash_unchanged'] else 'CHANGED'})",
              flush=True)
        rows.append(["-" if lam is None else f"{lam:g}", policy,
                     f"{100 * t['accuracy']:.2f}",
                     f"{drop:+.2f} ± {ev['drop_vs_final_exit']['test']['se_points']:.2f}",
                     f"{t['avg_cost_fraction']:.3f}",
                     " / ".join(f"{100 * x:.1f}" for x in t["exit_rates"]),
                     "unchanged" if entry["hash_unchanged"] else "CHANGED"])

    # one epoch of joint training of the same network, timed in this run
    joint = run(f"joint_epoch_{br}", branches + [
        "mode=mixed", *lam_overrides(1.0), "trainer.max_epochs=1",
        "checkpoint.enabled=false"], args, force=True)
    post_epoch = statistics.median(s for e in sweep for s in e["post_epoch_seconds"])
    joint_epoch = joint["train_epoch_seconds"][0]
    speedup = joint_epoch / post_epoch
    table = markdown_table(["lambda", "policy (val)", "test acc %", "drop vs backbone (points ± SE)",
                            "avg cost fraction", "exit rates %", "backbone hash"], rows)
    print(f"\nCIFAR-10 (JPEG) test set. resnet20 without exits: {100 * backbone_acc:.2f}% after "
          f"{args.backbone_epochs} epochs. PTEENet branches ({args.branch_convs} conv layers, "
          f"width {args.branch_width or 'of the stage'}) after stages "
          f"{sweep[0]['exit_stages'][:-1]}, post-trained {args.post_epochs} epochs; confidence "
          f"thresholds calibrated on val for a tolerance of {args.tolerance} point\n")
    print(table)
    print(f"\npost-training epoch {post_epoch:.1f} s (median) vs joint-training epoch "
          f"{joint_epoch:.1f} s: {speedup:.2f}x faster (target >= 2x)")
    met = [e["lambda"] for e in sweep if e["meets_target"]]
    print(f"target (drop <= {args.tolerance} point at avg cost <= 0.6) met for lambda: {met or 'none'}")
    # one operating point chosen without the test set: among the lambdas whose val
    # calibration met the tolerance, the one with the lowest val cost
    ok = [e for e in sweep if e["val_tolerance_met"]]
    selected = min(ok, key=lambda e: e["val_cost"]) if ok else None
    if selected is not None:
        print(f"chosen on val: lambda {selected['lambda']} ({selected['policy']}, val cost "
              f"{selected['val_cost']:.3f}): test {100 * selected['test_accuracy']:.2f}% "
              f"(drop {selected['drop_points']:+.2f}) at cost {selected['avg_cost']:.3f}; "
              f"target {'met' if selected['meets_target'] else 'missed'}")
    path = save_report(__file__, {
        "backbone": {"test_accuracy": backbone_acc, "epochs": args.backbone_epochs,
                     "epoch_seconds": plain.get("train_epoch_seconds")},
        "sweep": sweep, "post_epoch_median_s": post_epoch, "joint_epoch_s": joint_epoch,
        "posttrain_speedup": speedup, "target_met_for": met, "table": table,
        "chosen_on_val": None if selected is None else {
            k: selected[k] for k in ("lambda", "policy", "val_cost", "val_accuracy",
                                     "test_accuracy", "avg_cost", "drop_points", "meets_target")},
        "settings": vars(args)}, suffix=suffix)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
