"""Finished runs of the short CIFAR-10 (JPEG) recipe, read back: accuracy per epoch, test
accuracy, epoch times, and every evaluation made of them.

For runs trained by hand with ``eenet-train experiment=cifar10_recipe/<name>`` (issue 20)
before the paper tables (``experiments/tables.py``, which can take them with ``--adopt``)
have all their rows. Everything is read as data from each run folder, nothing is trained or
evaluated here:

- ``config.yaml``: backbone, loss, exits, epochs, seed, threads, the batch size, peak
  learning rate, weight decay, training augmentations and precision (``trainer.precision``;
  float32 where the config predates it), the schedule (one-cycle stepped per optimizer
  step, or per epoch as the runs before the change were) and the moving average of the
  weights (``ema.decay``; none before it existed);
- ``results.json``: test and val accuracy of the final exit (the checkpoint eenet-train
  evaluated: ``best_checkpoint``, chosen on val loss), per-exit test accuracy, training epoch
  seconds (eenet's EpochTimer; the median per epoch and their sum, the training time a user
  picks a budget by: a resumed run's epochs all count where results.json has
  ``training_segments``, and only the last process's in a run trained before eenet kept them
  across a resume), wall time, and the machines that trained it (``training_segments``; a
  ``machine.json`` beside a run trained before them);
- ``csv/metrics.csv``: val accuracy per epoch (a resumed run may repeat an epoch that ran
  after its last checkpoint; the last row of each epoch is taken, the one the resumed run
  wrote) and, for a run with early exits, where its own policy (the training config's
  thresholds) sent the val samples at each epoch (``val/exit<i>/rate``), summarised as the
  stretches of epochs over which one exit took the largest share;
- ``eval/*/results.json``: each ``eenet-eval`` of the run (policy, how its thresholds were
  chosen on val, val and test accuracy and cost, test exit rates).

A run folder still being trained (``INCOMPLETE`` present) is refused in one line.

    python experiments/cifar10_recipe/report.py experiments/runs/cifar10_recipe/resnet20_30ep_s0 ...
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

from eenet.errors import EENetError
from eenet.reporting.experiment import save_report
from eenet.reporting.results import trained_on, trained_precision


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EENetError(f"{path} cannot be read as JSON ({type(exc).__name__})") from None


def val_per_epoch(metrics: Path) -> tuple[dict[int, float], dict[int, list[float]]]:
    """From one read of metrics.csv, per epoch as it counts them (from 0), the last row of an
    epoch winning: val accuracy (final exit, ``val/acc``), and the share of val samples leaving
    at each exit under the run's own policy (``val/exit<i>/rate``; empty for one exit)."""
    acc: dict[int, float] = {}
    rates: dict[int, list[float]] = {}
    if not metrics.is_file():
        return acc, rates
    with metrics.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = sorted((c for c in reader.fieldnames or []
                       if c.startswith("val/exit") and c.endswith("/rate")),
                      key=lambda c: int(c[len("val/exit"):-len("/rate")]))
        for row in reader:
            if row.get("val/acc"):
                acc[int(row["epoch"])] = float(row["val/acc"])
            if len(cols) > 1 and all(row.get(c) for c in cols):
                rates[int(row["epoch"])] = [float(row[c]) for c in cols]
    return acc, rates


def dominant_exits(rates: dict[int, list[float]]) -> list[dict]:
    """Stretches of consecutive epochs over which one exit took the largest share of val, with
    the smallest and largest share it had there: ``[{"epochs": [first, last], "exit": i,
    "share": [min, max]}, ...]``."""
    out: list[dict] = []
    for epoch in sorted(rates):
        r = rates[epoch]
        top = max(range(len(r)), key=r.__getitem__)
        last = out[-1] if out else None
        if last and last["exit"] == top and last["epochs"][1] == epoch - 1:
            last["epochs"][1] = epoch
            last["share"] = [min(last["share"][0], r[top]), max(last["share"][1], r[top])]
        else:
            out.append({"epochs": [epoch, epoch], "exit": top, "share": [r[top], r[top]]})
    return out


def describe_dominant(stretches: list[dict]) -> str:
    """``0-1: exit 6 (100 %); 2: exit 2 (77 %); ...`` (share as min-max where it varied)."""
    parts = []
    for d in stretches:
        first, last = d["epochs"]
        lo, hi = (round(100 * v) for v in d["share"])
        share = f"{lo} %" if lo == hi else f"{lo}-{hi} %"
        parts.append(f"{first}{'' if first == last else f'-{last}'}: exit {d['exit']} ({share})")
    return "; ".join(parts)


#: issue 20's cost target for resnet20 with exits (within 1 point of the reference)
COST_TARGET = 0.45


def best_on_test_within(curve: list[dict], cost: float) -> float | None:
    """The best test accuracy over an evaluation's shared-threshold sweep (``test_curve``: the
    val curve's thresholds, measured on test) at an average cost of at most ``cost``, None
    where no point is that cheap. Thresholds chosen on test: a bound on what that policy family
    can give at that cost, never a result."""
    within = [p["accuracy"] for p in curve if p["avg_cost"] <= cost]
    return max(within) if within else None


def evaluations(run: Path) -> list[dict]:
    """Every finished eenet-eval of ``run`` (``eval/<name>/results.json``)."""
    out = []
    for res_path in sorted((run / "eval").glob("*/results.json")):
        if (res_path.parent / "INCOMPLETE").exists():
            continue
        r = _read_json(res_path)
        target = r.get("target") or {}
        chosen_by = {k: v for k, v in target.items() if not isinstance(v, (dict, list))}
        certified = (r.get("calibration") or {}).get("guarantee")
        if isinstance(certified, dict):  # a certified calibration (eenet-eval guarantee=)
            chosen_by["certified"] = {k: v for k, v in certified.items()
                                      if not isinstance(v, (dict, list))}
        out.append({"folder": str(res_path.parent), "policy": r.get("policy", {}).get("name"),
                    "thresholds": r.get("policy", {}).get("thresholds"),
                    "chosen_by": chosen_by,
                    "dynamic_speedup": (r.get("engine") or {}).get("speedup"),
                    "val_accuracy": r.get("val", {}).get("accuracy"),
                    "val_cost": r.get("val", {}).get("avg_cost_fraction"),
                    "test_accuracy": r["test"]["accuracy"],
                    "test_cost": r["test"]["avg_cost_fraction"],
                    "test_exit_rates": r["test"].get("exit_rates"),
                    "best_test_accuracy_within_cost_target": best_on_test_within(
                        (r.get("calibration") or {}).get("test_curve") or [], COST_TARGET)})
    return out


def schedule(cfg: dict) -> str:
    """The learning-rate schedule and how often it stepped (``scheduler.interval``; a config
    without it stepped once per epoch)."""
    sched = cfg.get("scheduler") or {}
    name = str(sched.get("_target_", "none")).rsplit(".", 1)[-1]
    return f"{name} per {sched.get('interval', 'epoch')}"


def training_data(cfg: dict) -> dict:
    """Batch size, peak learning rate (one-cycle's ``max_lr``, else the optimizer's), weight
    decay and the training augmentations of a run's config."""
    dm = (cfg.get("dataset") or {}).get("datamodule") or {}
    sched = cfg.get("scheduler") or {}
    augment = dm.get("augment") or []
    return {"precision": trained_precision(cfg),
            "batch_size": dm.get("batch_size"),
            "peak_lr": sched.get("max_lr", (cfg.get("optimizer") or {}).get("lr")),
            "weight_decay": (cfg.get("optimizer") or {}).get("weight_decay"),
            "augment": [augment] if isinstance(augment, str) else list(augment)}


def read_run(run: Path) -> dict:
    if not run.is_dir():
        raise EENetError(f"{run} is not a folder")
    if (run / "INCOMPLETE").exists():
        raise EENetError(f"{run} is still being trained (INCOMPLETE is there)")
    if not (run / "results.json").is_file():
        raise EENetError(f"{run} has no results.json: not a finished eenet-train run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    r = _read_json(run / "results.json")
    epochs_s = r.get("train_epoch_seconds") or []
    val, all_rates = val_per_epoch(run / "csv" / "metrics.csv")
    # the rows of the training epochs only: eenet-train's closing evaluation of the chosen
    # checkpoint is logged as one more epoch
    rates = {e: v for e, v in all_rates.items() if e < r["epochs"]}
    return {"run": str(run), "backbone": cfg["backbone"]["name"],
            "loss": cfg["loss"].get("_target_", "").rsplit(".", 1)[-1],
            "exits": len(r["exits"]), "epochs": r["epochs"], "seed": cfg["seed"],
            "threads": cfg.get("threads"), "label_smoothing": cfg["loss"].get("label_smoothing"),
            "schedule": schedule(cfg), "ema_decay": (cfg.get("ema") or {}).get("decay"),
            **training_data(cfg),
            # the final exit alone; and the run's own policy (its training config's thresholds)
            "test_accuracy": r["exits"][-1]["test_accuracy"],
            "val_accuracy": r["exits"][-1].get("val_accuracy", r["val"]["accuracy"]),
            "test_accuracy_run_policy": r["test"]["accuracy"],
            "test_cost_run_policy": r["test"].get("avg_cost_fraction"),
            "test_exit_rates_run_policy": r["test"].get("exit_rates"),
            "exit_test_accuracy": [e["test_accuracy"] for e in r["exits"]],
            "exit_cost_fraction": [e["cost_fraction"] for e in r["exits"]],
            "best_checkpoint": r.get("best_checkpoint"), "resumed_from": r.get("resumed_from"),
            "train_epoch_s_median": statistics.median(epochs_s) if epochs_s else None,
            "train_s": sum(epochs_s) if epochs_s else None,
            "wall_s": r.get("wall_s"), "trained_on": trained_on(run) or "not recorded",
            "val_accuracy_per_epoch": val,
            "val_exit_rates_per_epoch": rates, "val_dominant_exit": dominant_exits(rates),
            "evaluations": evaluations(run)}


def table(runs: list[dict]) -> str:
    lines = ["| run | backbone, exits | schedule, EMA | batch, peak lr, weight decay, augmentation, "
             "precision | epochs | "
             "seed | val % (final exit) | test % (final exit) | epoch s (median), threads, machine | "
             "training min (sum of epochs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ema = f"EMA {r['ema_decay']:g}" if r["ema_decay"] else "no EMA"
        wd = "-" if r["weight_decay"] is None else f"{r['weight_decay']:g}"
        lines.append(f"| {Path(r['run']).name} | {r['backbone']}, {r['exits']} | "
                     f"{r['schedule']}, {ema} | {r['batch_size']}, {r['peak_lr']}, {wd}, "
                     f"{'+'.join(r['augment']) or 'none'}, {r['precision']} | {r['epochs']} | "
                     f"{r['seed']} | {100 * r['val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} | "
                     f"{r['train_epoch_s_median']:.0f}, {r['threads'] or 'default'}, "
                     f"{r['trained_on']} | "
                     f"{r['train_s'] / 60:.0f} |")
    trained = [r for r in runs if r["val_dominant_exit"]]
    if trained:
        lines += ["", "| run | own policy: test % / cost | where val left during training "
                  "(epochs from 0: the exit with the largest share) |", "|---|---|---|"]
        for r in trained:
            cost = r["test_cost_run_policy"]
            lines.append(f"| {Path(r['run']).name} | {100 * r['test_accuracy_run_policy']:.2f} / "
                         f"{'-' if cost is None else f'{cost:.3f}'} | "
                         f"{describe_dominant(r['val_dominant_exit'])} |")
    evals = [(r, e) for r in runs for e in r["evaluations"]]
    if evals:
        lines += ["", "| run | evaluation | policy | chosen on val by | val % / cost | "
                  "test % / cost | test exit rates % | best test % at cost <= "
                  f"{COST_TARGET} (one shared threshold chosen on test: a bound, not a result) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, e in evals:
            c = e["chosen_by"]
            how = f"{c.get('kind')} {c.get('value')}"
            if "certified" in c:
                g = c["certified"]
                how = (f"{g.get('method')}: {g.get('risk')} <= {g.get('alpha')} w.p. >= "
                       f"{1 - float(g.get('delta', 0)):g}")
            rates = " / ".join(f"{100 * v:.1f}" for v in e["test_exit_rates"] or [])
            bound = e["best_test_accuracy_within_cost_target"]
            lines.append(f"| {Path(r['run']).name} | {Path(e['folder']).name} | {e['policy']} | "
                         f"{how} | {100 * e['val_accuracy']:.2f} / {e['val_cost']:.3f} | "
                         f"{100 * e['test_accuracy']:.2f} / {e['test_cost']:.3f} | {rates} | "
                         f"{'-' if bound is None else f'{100 * bound:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python experiments/cifar10_recipe/report.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished eenet-train run folders")
    p.add_argument("--suffix", default="", help="appended to the JSON's name (report<suffix>.json)")
    args = p.parse_args(argv)
    try:
        runs = [read_run(Path(r)) for r in args.runs]
    except EENetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    text = table(runs)
    print(text)
    seeds = sorted({r["seed"] for r in runs})
    # thresholds: each evaluation's own target on val; checkpoint: eenet-train's best val loss
    chosen = {"thresholds": "val", "checkpoint": "val"}
    out = save_report(__file__, {"runs": runs, "markdown": text}, args.suffix, seeds=seeds,
                      chosen_on=chosen)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
