"""PTEENet on CIFAR-10 (JPEG): branches post-trained on a frozen resnet20, one study per config.

Lahiany & Aperstein, "PTEENet: Post-Trained Early-Exit Neural Networks
Augmentation for Inference Cost Optimization", IEEE Access 2022.

A study is a Hydra experiment config,
``eenet/conf/experiment/pteenet_cifar10/<study>.yaml``: the branches'
post-training run (an ordinary ``eenet-train`` config: exit block, placement,
targets, loss, epochs) plus a ``study`` node that only this script reads (the
backbone's own run, the lambda sweep, the exit policies, the tolerance and its
optimism correction). For a study, the script:

1. trains resnet20 without exits (``study.backbone``, plus
   ``placement.stages=[] loss=multi_ce``) once: its run folder is named by a
   hash of its configuration, so every study with the same backbone recipe
   reuses it;
2. post-trains the branches on the frozen backbone (``mode=posttrain``), once
   per lambda in ``study.lambdas`` (the loss's ``lambda_coef``; one run for a
   loss without one); the backbone's state hash is recorded before and after,
   and the final exit is the backbone's own classifier;
3. calibrates each policy in ``study.policies`` on the validation split for a
   tolerance of ``study.tolerance`` points below the final exit (= the
   backbone), tightened by the K-fold estimate of the search's optimism when
   ``study.optimism_folds`` >= 2 (repeated ``study.optimism_repeats`` times;
   ``eenet/calibration/search.py``); the policy with the lowest val cost is
   reported on test, run by the dynamic engine
   (:func:`eenet.jobs.evaluate.evaluate`), with the drop against the final exit
   and its paired standard error. One lambda is chosen without the test set:
   the one whose calibrated point costs least on val (``chosen_on_val``). An
   exit whose threshold comes out as ``inf`` releases no sample and its branch
   is neither run nor charged, so the calibration also chooses the branches;
4. times one epoch of joint training of the same network (``mode=mixed``)
   against the post-training epochs (re-timed on every run of the script, in a
   new folder each time).

Targets: test accuracy within ``study.tolerance`` points of the backbone at an
average cost fraction of at most ``study.max_cost``; backbone hash unchanged;
post-training epochs at least 2x faster than a joint-training epoch.

Overrides after the options are Hydra overrides of the study's config. They
apply to the branch runs; those of the data (``dataset...``, ``data_root``) and
``threads`` apply to the backbone's run as well. A lambda given on the command
line (e.g. ``loss.terms.eenet.lambda_coef=2``) replaces the sweep. The results
are ``results/<name>.json`` beside this script, with the study, the overrides,
the ``study`` settings and the composed configuration recorded inside; the
name is the study's, or ``<study>-<hash of the overrides>`` when overrides
change it (``--name`` chooses one). Runs go to ``experiments/runs/pteenet``.

    python experiments/pteenet/run.py --list
    python experiments/pteenet/run.py --study every_stage_ce threads=2
    python experiments/pteenet/run.py loss.terms.eenet.lambda_coef=2 seed=1 --name kd_lambda2_seed1
    python experiments/pteenet/run.py --study paper --smoke     # the pipeline on digits
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from eenet.config import check_command_line, compose_config, config_dir
from eenet.errors import EENetError
from eenet.io import first_line
from eenet.jobs.evaluate import evaluate
from eenet.jobs.train import train
from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"
RUNS = HERE.parent / "runs" / "pteenet"
STUDIES = "pteenet_cifar10"  # eenet/conf/experiment/pteenet_cifar10/<study>.yaml
DEFAULT_STUDY = "every_stage_kd_cv"
# overrides that also apply to the backbone's run: the data and the threads
SHARED = ("dataset", "data_root", "threads")
# --smoke: the whole pipeline on the bundled digits, one epoch per run
SMOKE = ["dataset=digits", "trainer.max_epochs=1"]
# the settings of a run that do not change what it computes (left out of its folder's hash)
VOLATILE = ("output_dir", "data_root", "threads", "logger", "study", "overwrite")


def study_names() -> list[str]:
    """The configs of ``eenet/conf/experiment/pteenet_cifar10`` (``_*`` are shared parts)."""
    return sorted(p.stem for p in (config_dir() / "experiment" / STUDIES).glob("*.yaml")
                  if not p.stem.startswith("_"))


def override_key(override: str) -> str:
    """``a.b=c`` -> ``a.b`` (leading ``+``/``~`` dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*lists: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for o in overrides:
            merged.pop(override_key(o), None)  # the later one also takes the later place
            merged[override_key(o)] = o
    return list(merged.values())


def lambda_key(loss: DictConfig, prefix: str = "loss") -> str | None:
    """Dotted path of the loss's ``lambda_coef`` (None for a loss without one)."""
    found = []
    for key, value in loss.items():
        if key == "lambda_coef":
            found.append(f"{prefix}.{key}")
        elif isinstance(value, DictConfig):
            sub = lambda_key(value, f"{prefix}.{key}")
            if sub:
                found.append(sub)
    if len(found) > 1:
        raise EENetError(f"the loss has several lambda_coef ({', '.join(found)}); the sweep "
                         f"needs exactly one")
    return found[0] if found else None


def config_hash(cfg: DictConfig) -> str:
    """Hash of what a run computes: the resolved config without :data:`VOLATILE` keys.

    The data's location is left out too (``dataset.datamodule.root``), and the
    backbone checkpoint is named by its folder (itself named by a hash), so a
    moved ``experiments/runs`` keeps its runs.
    """
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE:
        c.pop(key, None)
    c.get("dataset", {}).get("datamodule", {}).pop("root", None)
    # a copy of dataset.num_classes passed to the data module since its checks (issue 16):
    # left out so that runs made before it keep their hash
    c.get("dataset", {}).get("datamodule", {}).pop("num_classes", None)
    c.get("trainer", {}).pop("enable_progress_bar", None)
    if c.get("backbone", {}).get("checkpoint"):
        c["backbone"]["checkpoint"] = Path(c["backbone"]["checkpoint"]).name
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


def compose(overrides: list[str]) -> DictConfig:
    """The train config for ``overrides``, its output folder left to :func:`run`."""
    return compose_config(overrides, output_dir="unset")


def study_config(name: str, user: list[str] = (), smoke: bool = False
                 ) -> tuple[DictConfig, list[str], list[str]]:
    """A study's branch config and the overrides of its branch runs and of its backbone's run.

    Args:
        name: the study (``eenet/conf/experiment/pteenet_cifar10/<name>.yaml``).
        user: the command line's overrides.
        smoke: add :data:`SMOKE` (digits, one epoch) to both runs.
    """
    common = ["trainer.enable_progress_bar=false", "logger=csv", f"data_root={DATA}"]
    extra = SMOKE if smoke else []
    shared = [o for o in user if override_key(o).split(".")[0] in SHARED]
    branch_overrides = merge_overrides(common, [f"experiment={STUDIES}/{name}"], extra, user)
    cfg = compose(branch_overrides)
    backbone_overrides = merge_overrides(
        common, list(cfg.study.backbone), ["placement.method=explicit", "placement.stages=[]",
                                           "loss=multi_ce"], extra, shared)
    return cfg, branch_overrides, backbone_overrides


def run(kind: str, cfg: DictConfig, runs: Path, retrain: bool, fresh: bool = False
        ) -> tuple[dict, Path]:
    """Train ``cfg`` into ``runs/<kind>-<config hash>``, or reuse that finished run.

    ``fresh``: always train, into a new time-stamped folder inside that one (a timing
    run: finished ones are kept).
    """
    out = runs / f"{kind}-{config_hash(cfg)}"
    if fresh:
        out = out / time.strftime("%Y%m%d-%H%M%S")
    done = out / "results.json"
    if done.is_file() and not (retrain or fresh):
        print(f"reusing {out}", flush=True)
        return json.loads(done.read_text()), out
    with open_dict(cfg):
        cfg.output_dir = str(out)
        cfg.overwrite = True  # not reused (absent, unfinished or retrained): replaced
    print(f"training {out}", flush=True)
    results, _ = train(cfg)  # writes results.json (eenet's own format) into the folder
    return results, out


def calibrate_and_test(run_dir: Path, study: DictConfig, policy: str, retrain: bool) -> dict:
    """Thresholds of ``policy`` calibrated on val, evaluated on test (into the run's folder).

    A finished evaluation with the same settings is reused unless ``retrain``.
    """
    overrides = [f"run={run_dir}", f"tolerance={study.tolerance}", f"policy={policy}",
                 f"optimism_folds={study.optimism_folds}",
                 f"optimism_repeats={study.optimism_repeats}"]
    tag = hashlib.sha256(" ".join(overrides[1:]).encode()).hexdigest()[:8]
    out = run_dir / f"eval-{policy}-{tag}"
    if (out / "results.json").is_file() and not retrain:
        print(f"reusing {out}", flush=True)
        return json.loads((out / "results.json").read_text())
    return evaluate(compose_config([*overrides, "overwrite=true"], output_dir=out,
                                   config_name="eval"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python experiments/pteenet/run.py", description=__doc__.splitlines()[0],
        epilog="overrides: Hydra overrides of the study's config, e.g. seed=1 "
               "loss.terms.eenet.lambda_coef=2 study.policies=[max_prob] threads=2")
    p.add_argument("--study", default=DEFAULT_STUDY,
                   help=f"eenet/conf/experiment/{STUDIES}/<study>.yaml (default {DEFAULT_STUDY})")
    p.add_argument("--name", default=None,
                   help="name of the results file (default: the study's; with overrides, "
                        "<study>-<hash of the overrides>)")
    p.add_argument("--list", action="store_true", help="list the studies and exit")
    p.add_argument("--smoke", action="store_true",
                   help="the whole pipeline on the bundled digits, one epoch per run; runs "
                        "and results go under --runs (default experiments/runs/pteenet_smoke)")
    p.add_argument("--runs", type=Path, default=None, help=f"run folders (default {RUNS})")
    p.add_argument("--retrain", action="store_true", help="retrain runs that already finished")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = git_revision(__file__)  # the code this run starts with (commits may land before it ends)
    if args.list:
        for name in study_names():
            text = (config_dir() / "experiment" / STUDIES / f"{name}.yaml").read_text()
            about = [ln[2:] for ln in text.splitlines()[1:] if ln.startswith("# ")]
            print(f"{name:26s} {about[0] if about else ''}")
        sys.exit(0)
    if args.study not in study_names():
        raise EENetError(f"unknown study '{args.study}'; accepted: {', '.join(study_names())}")
    for o in args.overrides:
        if "=" not in o or o.startswith("-"):
            raise EENetError(f"'{o}' is not an override (key=value) nor an option (see --help)")
    check_command_line(args.overrides)  # one line for an unknown group option
    user = list(args.overrides)
    changes = [o for o in user if override_key(o) not in ("data_root", "threads")]
    name = args.name or (args.study if not changes else args.study + "-" + hashlib.sha256(
        " ".join(changes).encode()).hexdigest()[:8])
    runs = args.runs or (RUNS.with_name("pteenet_smoke") if args.smoke else RUNS)
    results_path = (runs if args.smoke else HERE / "results") / f"{name}.json"
    cfg, branch_overrides, backbone_overrides = study_config(args.study, user, args.smoke)
    study = cfg.study

    lam_key = lambda_key(cfg.loss)
    user_keys = {override_key(o) for o in user}
    lambdas = ([None] if lam_key is None
               else [OmegaConf.select(cfg, lam_key)] if lam_key in user_keys
               else list(study.lambdas))

    # 1. the backbone, trained once
    backbone_cfg = compose(backbone_overrides)
    plain, bb_dir = run("backbone", backbone_cfg, runs, args.retrain)
    backbone_acc = plain["exits"][-1]["test_accuracy"]
    recipe = " ".join(o for o in backbone_overrides if override_key(o) not in
                      ("trainer.enable_progress_bar", "logger", "data_root"))

    def branches(extra: list[str]) -> DictConfig:
        return compose(merge_overrides(branch_overrides, [f"backbone.checkpoint={bb_dir}"], extra))

    # 2.-3. the branches for each lambda, calibrated on val, evaluated on test
    rows, sweep = [], []
    for lam in lambdas:
        r, run_dir = run("branches", branches([] if lam is None else [f"{lam_key}={lam}"]),
                         runs, args.retrain)
        evs = {p: calibrate_and_test(run_dir, study, p, args.retrain) for p in study.policies}
        val_cost = {k: v["calibration"]["chosen"]["avg_cost"] for k, v in evs.items()}
        policy = min(study.policies, key=lambda k: val_cost[k])
        ev = evs[policy]
        t = ev["test"]
        drop = 100 * (backbone_acc - t["accuracy"])
        entry = {"lambda": lam, "run_dir": str(run_dir), "policy": policy,
                 "val_cost_by_policy": val_cost,
                 "val_accuracy": ev["val"]["accuracy"], "val_cost": val_cost[policy],
                 "val_tolerance_met": bool(ev["calibration"]["reachable"]),
                 # drops against the final exit on the same samples, with paired standard errors
                 "drop_vs_final_exit": ev["drop_vs_final_exit"],
                 "test_by_policy": {k: {"accuracy": v["test"]["accuracy"],
                                        "avg_cost": v["test"]["avg_cost_fraction"]}
                                    for k, v in evs.items()},
                 "test_accuracy": t["accuracy"], "avg_cost": t["avg_cost_fraction"],
                 "exit_rates": t["exit_rates"], "drop_points": drop,
                 "meets_target": (drop <= study.tolerance
                                  and t["avg_cost_fraction"] <= study.max_cost),
                 "thresholds": ev["policy"]["thresholds"],
                 "backbone_hash_before": r["backbone_hash_before"],
                 "backbone_hash_after": r["backbone_hash_after"],
                 "hash_unchanged": r["backbone_hash_before"] == r["backbone_hash_after"],
                 "exit_stages": [e["stage"] for e in r["exits"]],
                 "exit_test_accuracy": [e["test_accuracy"] for e in r["exits"]],
                 "post_epoch_seconds": r["train_epoch_seconds"],
                 "calibration_message": ev["calibration"]["message"],
                 "optimism": (ev.get("target") or ev["calibration"]["target"]).get("optimism")}
        sweep.append(entry)
        print(f"lambda {lam}: backbone hash {r['backbone_hash_before'][:16]}... -> "
              f"{r['backbone_hash_after'][:16]}... "
              f"({'unchanged' if entry['hash_unchanged'] else 'CHANGED'})", flush=True)
        rows.append(["-" if lam is None else f"{lam:g}", policy, f"{100 * t['accuracy']:.2f}",
                     f"{drop:+.2f} ± {ev['drop_vs_final_exit']['test']['se_points']:.2f}",
                     f"{t['avg_cost_fraction']:.3f}",
                     " / ".join(f"{100 * x:.1f}" for x in t["exit_rates"]),
                     "unchanged" if entry["hash_unchanged"] else "CHANGED"])

    # 4. one epoch of joint training of the same network, timed in this run
    joint_cfg = branches(["mode=mixed", "trainer.max_epochs=1", "checkpoint.enabled=false",
                          *([] if lam_key is None else [f"{lam_key}=1.0"])])
    joint, _ = run("joint", joint_cfg, runs, retrain=False, fresh=True)
    post_epoch = statistics.median(s for e in sweep for s in e["post_epoch_seconds"])
    joint_epoch = joint["train_epoch_seconds"][0]
    speedup = joint_epoch / post_epoch

    table = markdown_table(["lambda", "policy (val)", "test acc %",
                            "drop vs backbone (points ± SE)", "avg cost fraction",
                            "exit rates %", "backbone hash"], rows)
    print(f"\nstudy {args.study} ({name}), {cfg.dataset.name} test set. resnet20 without exits: "
          f"{100 * backbone_acc:.2f}% ({recipe}). Branches after stages "
          f"{sweep[0]['exit_stages'][:-1]}, post-trained {cfg.trainer.max_epochs} epochs; "
          f"thresholds calibrated on val for a tolerance of {study.tolerance} point\n")
    print(table)
    print(f"\npost-training epoch {post_epoch:.1f} s (median) vs joint-training epoch "
          f"{joint_epoch:.1f} s: {speedup:.2f}x faster (target >= 2x)")
    met = [e["lambda"] for e in sweep if e["meets_target"]]
    print(f"target (drop <= {study.tolerance} point at avg cost <= {study.max_cost}) met for "
          f"lambda: {met or 'none'}")
    # one operating point chosen without the test set: among the lambdas whose val
    # calibration met the tolerance, the one with the lowest val cost
    ok = [e for e in sweep if e["val_tolerance_met"]]
    selected = min(ok, key=lambda e: e["val_cost"]) if ok else None
    if selected is not None:
        print(f"chosen on val: lambda {selected['lambda']} ({selected['policy']}, val cost "
              f"{selected['val_cost']:.3f}): test {100 * selected['test_accuracy']:.2f}% "
              f"(drop {selected['drop_points']:+.2f}) at cost {selected['avg_cost']:.3f}; "
              f"target {'met' if selected['meets_target'] else 'missed'}")
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("study")
    config.pop("output_dir")
    # how each reported point was chosen: thresholds and policy on val for every lambda; the
    # lambda on val (chosen_on_val) when a sweep ran, fixed when the command line gave one
    chosen_on = {"thresholds": "val", "policy": "val"}
    if lam_key is not None:
        chosen_on["lambda"] = "fixed" if lam_key in user_keys else "val"
    path = save_report(str(results_path), {
        "study": args.study, "overrides": user, "smoke": args.smoke,
        "settings": OmegaConf.to_container(study, resolve=True), "lambda_key": lam_key,
        "backbone": {"test_accuracy": backbone_acc, "run_dir": str(bb_dir),
                     "overrides": backbone_overrides,
                     "epoch_seconds": plain.get("train_epoch_seconds")},
        "sweep": sweep, "post_epoch_median_s": post_epoch, "joint_epoch_s": joint_epoch,
        "posttrain_speedup": speedup, "target_met_for": met, "table": table,
        "chosen_on_val": None if selected is None else {
            k: selected[k] for k in ("lambda", "policy", "val_cost", "val_accuracy",
                                     "test_accuracy", "avg_cost", "drop_points", "meets_target")},
        "config": config},
        seeds={"backbone": int(backbone_cfg.seed), "branches": int(cfg.seed)},
        chosen_on=chosen_on, source=__file__, revision=started)
    print(f"saved {path}")
    return path


def run_script(main) -> None:
    """Run a study script's ``main``: a user's mistake (an EENetError, a Hydra override or
    composition error) is one line on stderr and exit status 2; the traceback only with
    HYDRA_FULL_ERROR=1. experiments/graph_pteenet/run.py uses it too."""
    try:
        main()
    except EENetError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # a Hydra override or composition error: one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not type(exc).__module__.startswith(
                ("hydra", "omegaconf")):
            raise
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_script(main)
