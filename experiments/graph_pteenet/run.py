"""PTEENet branches on torchvision's own resnet18, cut at graph nodes (issue 17, third item).

Lahiany & Aperstein, "PTEENet: Post-Trained Early-Exit Neural Networks
Augmentation for Inference Cost Optimization", IEEE Access 2022: branches
(convs + a confidence head) post-trained on a frozen, trained backbone.

Here the backbone is not one of eenet's staged networks but torchvision's
resnet18 architecture (``backbone=torchvision backbone.name=resnet18``, 7x7 stem
and max-pool included, so a 32x32 image is 8x8 after the stem), which eenet cuts
into segments at graph nodes (:mod:`eenet.models.graph_split`). On CIFAR-10 (JPEG)
at 32x32 the script:

1. trains resnet18 without exits (``placement.stages=[] loss=multi_ce``), SGD
   (lr 0.1, Nesterov, wd 5e-4) with cosine decay, random crop + flip, the
   checkpoint chosen on val; its folder is named by a hash of its config
   (``experiments/pteenet/run.py``'s ``config_hash``), a stopped run is continued
   (``resume=true``) from its ``checkpoints/last.ckpt``;
2. post-trains PTEENet branches (``exit=pteenet exit.convs=1``: one 3x3 conv, BN,
   ReLU at the node's width, pooling, a confidence head and a classifier; the paper
   allows 1 to 3 convs, one keeps a branch at about 6 % of the backbone's MACs) at
   the nodes ``--exits-at`` (default after layer1, layer2, layer3) on the frozen
   backbone (``mode=posttrain``) for ``--post-epochs`` epochs, with
   ``loss=eenet_v2_kd`` (EENets' cost-aware loss that trains the confidence heads,
   plus per-exit cross-entropy and distillation from the final exit: the loss of the
   PTEENet study that met its target, every_stage_kd_cv); the backbone's state hash before and
   after is recorded;
3. calibrates each policy of ``--policies`` on val for a tolerance of 1 point below
   the final exit (= the backbone) (``eenet.jobs.evaluate``, its own timing off), keeps
   the one with the lowest val cost among those that met the tolerance on val, and
   reports its test accuracy and average cost fraction (dynamic engine), with the
   backbone's own test accuracy;
4. times the dynamic engine at those thresholds against the unsplit torchvision
   model (``net.backbone`` straight through) on the test set at batch 256 and batch 1,
   median of ``--reps`` interleaved repetitions in the same process, threads and load
   average recorded.

``--bench-only`` reruns step 4 alone on the finished runs (e.g. on an idle machine
at 2 threads) and writes its own JSON. Results: ``results/<name>.json`` beside
this script; runs under ``experiments/runs/graph_pteenet``.

    python experiments/graph_pteenet/run.py threads=1          # resumes a stopped run
    python experiments/graph_pteenet/run.py --bench-only --threads 2
    python experiments/graph_pteenet/run.py --smoke     # the pipeline, minutes, tiny subsets
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

from omegaconf import open_dict

from eenet.config import check_command_line
from eenet.errors import EENetError
from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs" / "graph_pteenet"


def _load(name: str, path: Path):
    """A script beside this one's, loaded by path (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the PTEENet studies' pieces: compose, config_hash, merge_overrides, override_key, DATA
pte = _load("pteenet_run", HERE.parent / "pteenet" / "run.py")
# the graph-split benchmark's timing helpers: timed, batches_of
bench = _load("bench_graph_split", HERE.parent / "bench" / "bench_graph_split.py")

MODEL = ["dataset=cifar10_jpeg", "backbone=torchvision", "backbone.name=resnet18"]
#: the backbone's recipe (its epochs come from --backbone-epochs)
BACKBONE = [*MODEL, "optimizer=sgd", "scheduler=cosine", "seed=0", "placement.method=explicit",
            "placement.stages=[]", "loss=multi_ce",
            # stated here since conf/loss/multi_ce.yaml no longer names it (8fb3cba): the run
            # folder's hash, and so its reuse, does not change with that default
            "++loss.label_smoothing=0.0"]
#: the branches' recipe (exits_at, checkpoint and epochs added by the script)
BRANCHES = [*MODEL, "mode=posttrain", "targets=labels", "exit=pteenet", "exit.convs=1",
            "loss=eenet_v2_kd", "loss.terms.eenet.lambda_coef=1.0", "optimizer=adam", "seed=0"]
#: why the default --backbone-epochs (recorded in the JSON with the measured epoch times)
EPOCHS_REASON = (
    "chosen at 01:41 UTC to end by about 03:05 UTC at 1 thread on a shared 2-core machine: a "
    "quarter epoch (88 of 352 batches, then val) took 44 s at 01:23 (load average 1.7), about "
    "160 s per epoch, which gave 30 epochs; by 01:30 the load average was 6-9 (other sessions' "
    "tests) and the first epochs ran at 1.7-2.1 s per batch (about 11 min per epoch), so the "
    "run was restarted with 8 epochs (30 and then 12 abandoned after part of their first epoch)")
COMMON = ["trainer.enable_progress_bar=false", "logger=csv", f"data_root={pte.DATA}"]
#: --smoke: tiny subsets, one epoch each (a check of the pipeline, not a result)
SMOKE = ["dataset.datamodule.train_subset=1024", "dataset.datamodule.val_size=256",
         "dataset.datamodule.test_subset=512"]


def train_or_resume(kind: str, overrides: list[str], runs: Path) -> tuple[dict, Path]:
    """Train ``overrides`` into ``runs/<kind>-<config hash>``; reuse it when finished,
    continue it (``resume=true``) when it stopped after a saved epoch."""
    from eenet.jobs.train import train

    cfg = pte.compose(overrides)
    out = runs / f"{kind}-{pte.config_hash(cfg)}"
    done = out / "results.json"
    if done.is_file():
        print(f"reusing {out}", flush=True)
        return json.loads(done.read_text()), out
    last = out / "checkpoints" / "last.ckpt"
    with open_dict(cfg):
        cfg.output_dir = str(out)
        if last.is_file():
            cfg.resume = True
        else:
            cfg.overwrite = True  # absent, or stopped before its first epoch was saved
    print(f"{'resuming' if last.is_file() else 'training'} {out}", flush=True)
    results, _ = train(cfg)
    return results, out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python experiments/graph_pteenet/run.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--backbone-epochs", type=int, default=8,
                   help="epochs of the backbone's training (default 8, see EPOCHS_REASON)")
    p.add_argument("--epochs-reason", default=None,
                   help="why that many epochs (recorded in the JSON; default: EPOCHS_REASON "
                        "for the default count)")
    p.add_argument("--post-epochs", type=int, default=5, help="post-training epochs (default 5)")
    p.add_argument("--exits-at", default="layer1,layer2,layer3",
                   help="graph nodes the branches read, comma-separated")
    p.add_argument("--policies", default="confidence,max_prob,entropy",
                   help="exit policies calibrated on val; the lowest val cost is reported")
    p.add_argument("--tolerance", type=float, default=1.0, help="accuracy points (default 1)")
    p.add_argument("--optimism-folds", type=int, default=0,
                   help="K >= 2: tighten the tolerance by the K-fold estimate of the threshold "
                        "search's optimism on val (default 0: no correction)")
    p.add_argument("--optimism-repeats", type=int, default=4,
                   help="shuffles of that estimate (with --optimism-folds; default 4)")
    p.add_argument("--backbone-only", action="store_true", help="step 1 only")
    p.add_argument("--bench-only", action="store_true",
                   help="step 4 only, on the finished runs (their results JSON must exist)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the timing")
    p.add_argument("--reps", type=int, default=5, help="timing repetitions (median)")
    p.add_argument("--samples-1", type=int, default=1000, help="test samples timed at batch 1")
    p.add_argument("--samples-256", type=int, default=10000,
                   help="test samples timed at batch 256")
    p.add_argument("--name", default=None, help="results file name (default: graph_pteenet)")
    p.add_argument("--smoke", action="store_true",
                   help="the pipeline on tiny subsets, one epoch per run, runs and results "
                        "under experiments/runs/graph_pteenet_smoke")
    p.add_argument("overrides", nargs="*", help="threads=N, data_root=... (both runs)")
    return p.parse_intermixed_args(argv)


def backbone_overrides(args: argparse.Namespace) -> list[str]:
    """The backbone's run: :data:`BACKBONE`, its epochs, and the data / threads overrides."""
    shared = [o for o in args.overrides if pte.override_key(o).split(".")[0] in pte.SHARED]
    epochs = 1 if args.smoke else args.backbone_epochs
    return pte.merge_overrides(COMMON, BACKBONE, [f"trainer.max_epochs={epochs}"],
                               SMOKE if args.smoke else [], shared)


def calibrate(run_dir: Path, policy: str, tolerance: float, threads: int | None,
              folds: int = 0, repeats: int = 1) -> dict:
    """``eenet-eval``: thresholds of ``policy`` on val for ``tolerance`` points, the dynamic
    engine on test, into ``run_dir/eval-<policy>-tol<tolerance>[-cv<folds>x<repeats>]``
    (reused when finished). ``folds`` >= 2 tightens the tolerance by the repeated K-fold
    estimate of the search's optimism, on val (``eenet/calibration/search.py``). Its own
    timing is off (``timing_passes=0``): step 4 times the engine."""
    from eenet.config import compose_config
    from eenet.jobs.evaluate import evaluate

    cv = [f"optimism_folds={folds}", f"optimism_repeats={repeats}"] if folds else []
    out = run_dir / (f"eval-{policy}-tol{tolerance:g}" + (f"-cv{folds}x{repeats}" if folds else ""))
    if (out / "results.json").is_file():
        print(f"reusing {out}", flush=True)
        return json.loads((out / "results.json").read_text())
    print(f"calibrating {policy} on val: {out}", flush=True)
    return evaluate(compose_config([f"run={run_dir}", f"tolerance={tolerance}", f"policy={policy}",
                                    "timing_passes=0", "overwrite=true", *cv,
                                    *([f"threads={threads}"] if threads else [])],
                                   output_dir=out, config_name="eval"))


def branch_overrides(args: argparse.Namespace, bb_dir: Path) -> list[str]:
    """The branches' run on the backbone in ``bb_dir`` (every command-line override applies)."""
    at = ",".join(a.strip() for a in args.exits_at.split(","))
    epochs = 1 if args.smoke else args.post_epochs
    return pte.merge_overrides(COMMON, BRANCHES, [f"backbone.exits_at=[{at}]",
                                                  f"backbone.checkpoint={bb_dir}",
                                                  f"trainer.max_epochs={epochs}"],
                               SMOKE if args.smoke else [], args.overrides)


def time_engine(run_dir: Path, policy: dict, threads: int, reps: int,
                sizes: dict[int, int]) -> dict:
    """Wall-clock of the dynamic engine at ``policy`` against the unsplit model.

    The unsplit model is ``net.backbone``, torchvision's resnet18 itself, called straight
    through. Both run the first test samples at each batch size (``sizes``: batch ->
    samples), interleaved (the order reversed every other repetition), ``reps`` times
    in this process; the speed-up is the ratio of the medians. Before timing, the
    engine's predictions for the samples that reach the final exit are compared with
    the unsplit model's on the same samples (recorded: the engine ran the earlier
    segments on larger batches, whose float sums may differ in the last bits).
    """
    import torch

    from eenet.inference import DynamicEngine
    from eenet.policies import create_policy
    from eenet.runs import load_run

    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    _, dm, net, cost = load_run(run_dir)
    engine = DynamicEngine(net, create_policy(policy["name"], policy["thresholds"],
                                              policy.get("temperatures")), cost)
    plain = net.backbone.eval()
    final = net.num_exits - 1
    out = {"threads": threads, "reps": reps, "policy": policy, "by_batch": []}
    for bs, n in sizes.items():
        batches = bench.batches_of(dm.test_dataset, bs, n)
        exits, costs, same, reached = [], [], 0, 0
        with torch.inference_mode():
            for x in batches:
                o = engine(x)
                last = o.exit == final
                if bool(last.any()):
                    same += int((o.pred[last] == plain(x[last]).argmax(1)).sum())
                    reached += int(last.sum())
                exits.append(o.exit)
                costs.append(o.cost)
        exit_idx = torch.cat(exits)
        variants = {"unsplit": plain, "engine": engine}
        for fn in variants.values():  # warm-up
            bench.timed(fn, batches[:3])
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(reps):
            for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                times[k].append(bench.timed(variants[k], batches))
        med = {k: statistics.median(v) for k, v in times.items()}
        samples = int(exit_idx.numel())
        out["by_batch"].append({
            "batch_size": bs, "samples": samples, "seconds": times, "median_s": med,
            "relative_spread": {k: (max(v) - min(v)) / statistics.median(v)
                                for k, v in times.items()},
            "speedup": med["unsplit"] / med["engine"],
            "ms_per_sample": {k: 1e3 * v / samples for k, v in med.items()},
            "exit_rates": (torch.bincount(exit_idx, minlength=net.num_exits).double()
                           / samples).tolist(),
            "avg_cost_fraction": float(torch.cat(costs).double().mean()),
            "final_exit_samples": reached, "final_exit_same_as_unsplit": same})
        b = out["by_batch"][-1]
        print(f"batch {bs}: unsplit {b['ms_per_sample']['unsplit']:.3f} ms/sample, engine "
              f"{b['ms_per_sample']['engine']:.3f} ms/sample, speed-up {b['speedup']:.2f}x "
              f"(spread {100 * b['relative_spread']['unsplit']:.0f} / "
              f"{100 * b['relative_spread']['engine']:.0f} %); final exit: {same} of {reached} "
              f"predictions equal to the unsplit model's", flush=True)
    out["load_average_before"], out["load_average_after"] = load_before, os.getloadavg()
    cores = os.cpu_count() or 1
    out["machine_note"] = (f"{threads} thread(s); load average {load_before[0]:.2f} before, "
                           f"{out['load_average_after'][0]:.2f} after, on {cores} cores"
                           + (": a loaded machine, the figures are indicative only"
                              if max(load_before[0], out["load_average_after"][0]) + threads
                              > cores + 0.5 else ""))
    return out


def bench_rows(timing: dict) -> str:
    rows = [[b["batch_size"], b["samples"], f"{b['ms_per_sample']['unsplit']:.3f}",
             f"{b['ms_per_sample']['engine']:.3f}", f"{b['speedup']:.2f}x",
             f"{b['avg_cost_fraction']:.3f}",
             " / ".join(f"{100 * s:.0f}" for s in b["relative_spread"].values())]
            for b in timing["by_batch"]]
    return markdown_table(["batch", "test samples", "unsplit ms/sample", "engine ms/sample",
                           "speed-up", "avg cost fraction", "spread % (unsplit / engine)"], rows)


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if argv is None and not args.backbone_only:  # the timing's allocator settings
        bench.restart_with_malloc_env()
    started = git_revision(__file__)  # the code this run starts with
    for o in args.overrides:
        if "=" not in o or o.startswith("-"):
            raise EENetError(f"'{o}' is not an override (key=value) nor an option (see --help)")
    check_command_line(args.overrides)
    runs = RUNS.with_name("graph_pteenet_smoke") if args.smoke else RUNS
    name = args.name or "graph_pteenet"
    results_path = (runs if args.smoke else HERE / "results") / f"{name}.json"
    sizes = {256: args.samples_256, 1: args.samples_1}
    if args.smoke:
        sizes = {256: 512, 1: 20}

    if args.bench_only:  # step 4 alone, on the runs of an earlier complete run of the script
        if not results_path.is_file():
            raise EENetError(f"{results_path} does not exist: run the script without "
                             f"--bench-only first")
        done = json.loads(results_path.read_text())
        timing = time_engine(Path(done["chosen"]["run_dir"]), done["chosen"]["policy_config"],
                             args.threads, args.reps, sizes)
        table = bench_rows(timing)
        print(f"\n{timing['machine_note']}\n{table}")
        path = save_report(str(results_path), {
            "results_of": str(results_path), "run_dir": done["chosen"]["run_dir"],
            "timing": timing, "table": table},
            suffix=f"-bench-{args.threads}t", seeds=done.get("seeds"),
            chosen_on={"thresholds": "val", "policy": "val"}, source=__file__, revision=started)
        print(f"saved {path}")
        return path

    threads = next((int(o.split("=", 1)[1]) for o in args.overrides
                    if pte.override_key(o) == "threads"), None)
    reason = args.epochs_reason or (EPOCHS_REASON if args.backbone_epochs == 8 else
                                    "given on the command line without a reason")

    # 1. resnet18 without exits
    bb_overrides = backbone_overrides(args)
    plain, bb_dir = train_or_resume("backbone", bb_overrides, runs)
    backbone_acc = plain["exits"][-1]["test_accuracy"]
    print(f"backbone {bb_dir}: test accuracy {100 * backbone_acc:.2f}%", flush=True)
    if args.backbone_only:
        return None

    # 2. the branches, post-trained on the frozen backbone
    br_overrides = branch_overrides(args, bb_dir)
    r, run_dir = train_or_resume("branches", br_overrides, runs)
    unchanged = r["backbone_hash_before"] == r["backbone_hash_after"]
    print(f"backbone hash {r['backbone_hash_before'][:16]}... -> "
          f"{r['backbone_hash_after'][:16]}... ({'unchanged' if unchanged else 'CHANGED'})")

    # 3. thresholds on val for the tolerance, the dynamic engine on test
    policies = [p.strip() for p in args.policies.split(",")]
    evs = {p: calibrate(run_dir, p, args.tolerance, threads, args.optimism_folds,
                        args.optimism_repeats) for p in policies}
    val_cost = {p: ev["calibration"]["chosen"]["avg_cost"] for p, ev in evs.items()}
    reachable = [p for p in policies if evs[p]["calibration"]["reachable"]]
    policy = min(reachable or policies, key=lambda p: val_cost[p])
    ev = evs[policy]
    t = ev["test"]
    drop = 100 * (backbone_acc - t["accuracy"])

    # 4. wall-clock against the unsplit torchvision model
    timing = time_engine(run_dir, ev["policy"], args.threads, args.reps, sizes)

    by_policy = {p: {"val_accuracy": e["val"]["accuracy"], "val_cost": val_cost[p],
                     "val_tolerance_met": bool(e["calibration"]["reachable"]),
                     "test_accuracy": e["test"]["accuracy"],
                     "test_avg_cost": e["test"]["avg_cost_fraction"],
                     "test_exit_rates": e["test"]["exit_rates"],
                     "thresholds": e["policy"]["thresholds"]} for p, e in evs.items()}
    rows = [[p, f"{100 * v['val_accuracy']:.2f}", f"{v['val_cost']:.3f}",
             f"{100 * v['test_accuracy']:.2f}", f"{v['test_avg_cost']:.3f}",
             " / ".join(f"{100 * x:.1f}" for x in v["test_exit_rates"]),
             "<- chosen on val" if p == policy else ""] for p, v in by_policy.items()]
    table = markdown_table(["policy", "val acc %", "val cost", "test acc %", "test cost",
                            "test exit rates %", ""], rows)
    speed = {b["batch_size"]: b["speedup"] for b in timing["by_batch"]}
    print(f"\nCIFAR-10 (JPEG), 32x32: torchvision resnet18 trained {plain['epochs']} "
          f"epochs, test accuracy {100 * backbone_acc:.2f}%. PTEENet branches at "
          f"{args.exits_at}, post-trained {cfg_epochs(r)} epochs on the frozen backbone "
          f"(hash {'unchanged' if unchanged else 'CHANGED'}); thresholds on val for a "
          f"{args.tolerance:g}-point tolerance"
          + (f", tightened by its {args.optimism_folds}-fold x {args.optimism_repeats} estimate "
             f"of the search's optimism" if args.optimism_folds else "") + ".\n")
    print(table)
    print(f"\nchosen on val: {policy}: test {100 * t['accuracy']:.2f}% (drop {drop:+.2f} "
          f"points against the backbone) at average cost fraction {t['avg_cost_fraction']:.3f}")
    print(f"\nwall clock, {timing['machine_note']}\n{bench_rows(timing)}")
    cost = r["exits"]
    path = save_report(str(results_path), {
        "smoke": args.smoke, "overrides": args.overrides,
        "backbone": {"test_accuracy": backbone_acc, "val_accuracy": plain["exits"][-1].get(
                         "val_accuracy"), "run_dir": str(bb_dir), "overrides": bb_overrides,
                     "epochs": plain["epochs"],
                     "epochs_asked": 1 if args.smoke else args.backbone_epochs,
                     "epochs_reason": reason,
                     "epoch_seconds": plain["train_epoch_seconds"]},
        "branches": {"run_dir": str(run_dir), "overrides": br_overrides,
                     "exits_at": args.exits_at.split(","), "epochs": cfg_epochs(r),
                     "epoch_seconds": r["train_epoch_seconds"],
                     "exit_cost_fractions": [e["cost_fraction"] for e in cost],
                     "exit_test_accuracy": [e["test_accuracy"] for e in cost],
                     "backbone_hash_before": r["backbone_hash_before"],
                     "backbone_hash_after": r["backbone_hash_after"],
                     "hash_unchanged": unchanged},
        "tolerance_points": args.tolerance,
        "optimism_correction": ({"folds": args.optimism_folds, "repeats": args.optimism_repeats}
                                if args.optimism_folds else None),
        "by_policy": by_policy,
        "chosen": {"policy": policy, "run_dir": str(run_dir), "policy_config": ev["policy"],
                   "test_accuracy": t["accuracy"], "test_avg_cost_fraction":
                   t["avg_cost_fraction"], "test_exit_rates": t["exit_rates"],
                   "drop_points_vs_backbone": drop,
                   "drop_vs_final_exit": ev["drop_vs_final_exit"],
                   "val_tolerance_met": bool(ev["calibration"]["reachable"])},
        "timing": timing, "speedup_batch_256": speed.get(256), "speedup_batch_1": speed.get(1),
        "table": table, "timing_table": bench_rows(timing)},
        seeds={"backbone": int(plain["config"]["seed"]), "branches": int(r["config"]["seed"])},
        chosen_on={"thresholds": "val", "policy": "val",
                   "backbone_epochs": "fixed", "branch_recipe": "fixed"},
        source=__file__, revision=started)
    print(f"saved {path}")
    return path


def cfg_epochs(results: dict) -> int:
    """Epochs a run trained (its training record)."""
    return int(results["epochs"])


if __name__ == "__main__":
    pte.run_script(main)
