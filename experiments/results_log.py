"""The results sections of experiments/README.md, regenerated from the result JSONs.

Every figure of the measured-results log is written by this script from the JSON
that holds it, between marker lines of experiments/README.md::

    <!-- results:NAME -->
    ... generated: do not edit by hand ...
    <!-- /results:NAME -->

so a quoted figure cannot drift from its file. The prose around the blocks is
written by hand. Each table says how its operating points were chosen: on the
validation split (a result), fixed in advance, every value reported (none
chosen), or by test accuracy (marked as such: a reference, not a result).

    python experiments/results_log.py            # rewrite the blocks of experiments/README.md
    python experiments/results_log.py --check    # exit 1 with one line if the README differs

``--root DIR`` reads DIR/README.md and the JSONs under DIR instead (tests use a copy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

from eenet.io import atomic_write_text

HERE = Path(__file__).resolve().parent

# PTEENet studies in the order of the README's study table; any other results/<name>.json follows
STUDIES = ["paper", "paper_1conv", "sgd_1conv_6exits", "downsampling", "downsampling_multice",
           "every_stage_multice_16ep", "every_stage_multice", "every_stage_multice_cv",
           "every_stage_ce", "every_stage_ce_cv", "every_stage_kd", "every_stage_kd_cv",
           "every_stage_kd_cv_seed1"]
# made before the threshold search could switch a branch off (their revision_note says how):
# listed by name, their figures left out of the log
SUPERSEDED = ("paper", "paper_1conv")
# studies whose lambda was picked by a test result (their revision_note gives the commits)
PICKED_BY_TEST = {"every_stage_kd_cv_seed1": "lambda picked by seed 0's test result: reference only"}
# the policy the argparse script calibrated when a sweep entry does not name one (f1a0899:
# `policy=confidence` for every lambda)
DEFAULT_POLICY = "confidence"
# how the points of JSONs written before save_report recorded ``chosen_on`` were chosen, read
# from the scripts that wrote them (eenet.reporting.experiment.CHOSEN_ON's vocabulary)
CHOSEN_BEFORE = {
    "mnist_core/results.json": {"thresholds": "fixed", "lambda": "every", "confidence head": "every"},
    "mnist_budget/results.json": {"thresholds": "val", "policy": "val"},
    "mnist_budget/results_vs_plain.json": {"thresholds": "val", "policy": "val"},
    "mnist_budget/results_pool.json": {"thresholds": "val", "policy": "val"},
    "results/eenets.json": {"thresholds": "fixed", "lambda": "every"},
    "results/baselines.json": {"thresholds": "val"},
    "trecx_cifar10/results_10ep.json": {"thresholds": "val"},
    "trecx_cifar10/results_20ep.json": {"thresholds": "val"},
    "kws_subset/results.json": {"thresholds": "val"},
    "onnx_equivalence/results.json": {"thresholds": "val"},
    "kill_resume/results.json": {"thresholds": "fixed"},
    "bench/bench_inference.json": {"thresholds": "val"},
    "bench/bench_inference_folded.json": {"thresholds": "val"},
    "bench/bench_inference_pool.json": {"thresholds": "val"},
    # a JSON without chosen_on_val: the script reported every lambda, choosing none
    **{f"pteenet/results/{s}.json": {"thresholds": "val", "lambda": "every"}
       for s in ("paper", "paper_1conv", "sgd_1conv_6exits")},
    **{f"pteenet/results/{s}.json": {"thresholds": "val", "policy": "val", "lambda": "every"}
       for s in ("downsampling", "every_stage_ce", "every_stage_kd")},
    **{f"pteenet/results/{s}.json": {"thresholds": "val", "policy": "val", "lambda": "val"}
       for s in ("every_stage_ce_cv", "every_stage_kd_cv")},
    **{f"pteenet/results/{s}.json": {"thresholds": "val", "policy": "val"}
       for s in ("downsampling_multice", "every_stage_multice_16ep", "every_stage_multice",
                 "every_stage_multice_cv")},
    "pteenet/results/every_stage_kd_cv_seed1.json": {"thresholds": "val", "policy": "val",
                                                     "lambda": "test"},
}
VAL_MET = "tolerance target met on val"  # how the calibrator's message starts when val met it
MESSAGE = re.compile(r"accuracy ([0-9.]+)% at average cost fraction ([0-9.]+)")


class LogError(Exception):
    """A missing file, block or field: reported in one line."""


# ---- formatting ---------------------------------------------------------------------------

def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rates(xs: list[float]) -> str:
    return " / ".join(f"{100 * x:.1f}" for x in xs)


def lam(x) -> str:
    return "-" if x is None else f"{x:g}"


def points(x: float) -> str:
    """A signed difference in points, 2 decimals, without a ``-0.00``."""
    return f"{round(x, 2) + 0.0:+.2f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def link(rel: str, label: str | None = None) -> str:
    return f"[{label or Path(rel).stem}]({rel})"


class Log:
    """The JSONs under one experiments folder, read once each."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, dict] = {}

    def json(self, rel: str) -> dict:
        if rel not in self._cache:
            path = self.root / rel
            if not path.is_file():
                raise LogError(f"{path} is missing; the results log reads it")
            self._cache[rel] = json.loads(path.read_text())
        return self._cache[rel]

    def studies(self) -> list[str]:
        found = sorted(p.stem for p in (self.root / "pteenet" / "results").glob("*.json"))
        return [s for s in STUDIES if s in found] + [s for s in found if s not in STUDIES]

    def read(self) -> list[str]:
        return list(self._cache)


def chosen_on(log: Log, rel: str) -> dict[str, str] | None:
    """What the JSON records as ``chosen_on``, else what its script did (:data:`CHOSEN_BEFORE`)."""
    return log.json(rel).get("chosen_on") or CHOSEN_BEFORE.get(rel)


def describe_choice(choice: dict[str, str] | None) -> str:
    words = {"val": "on val", "test": "by test accuracy (reference only)", "fixed": "fixed",
             "every": "not chosen (all shown)"}
    return "-" if not choice else "; ".join(f"{k} {words[v]}" for k, v in choice.items())


# ---- PTEENet ------------------------------------------------------------------------------

def val_met(entry: dict) -> bool:
    if "val_tolerance_met" in entry:
        return bool(entry["val_tolerance_met"])
    return str(entry.get("calibration_message", "")).startswith(VAL_MET)


def val_point(entry: dict) -> tuple[float | None, float | None]:
    """(val accuracy, val cost) of the entry's chosen policy: recorded fields, else its calibration message."""
    acc, cost = entry.get("val_accuracy"), entry.get("val_cost")
    if cost is None and entry.get("policy") in entry.get("val_cost_by_policy", {}):
        cost = entry["val_cost_by_policy"][entry["policy"]]
    m = MESSAGE.search(str(entry.get("calibration_message", "")))
    if m:
        acc = float(m.group(1)) / 100 if acc is None else acc
        cost = float(m.group(2)) if cost is None else cost
    return acc, cost


def lambda_on_val(doc: dict) -> tuple[int | None, str]:
    """Index of the sweep entry chosen on val, and whether the JSON recorded it or this log applied the rule.

    The rule is experiments/pteenet/run.py's: among the lambdas whose val calibration
    met the tolerance, the one with the lowest val cost (the first on a tie).
    """
    sweep = doc["sweep"]
    rec = doc.get("chosen_on_val")
    if rec:
        for i, e in enumerate(sweep):
            if e["lambda"] == rec["lambda"] and e.get("policy") == rec["policy"]:
                return i, "recorded"
        raise LogError("chosen_on_val names no entry of the sweep")
    ok = [i for i, e in enumerate(sweep) if val_met(e) and val_point(e)[1] is not None]
    if not ok:
        return None, "none"
    if len(sweep) == 1 and sweep[0]["lambda"] is None:
        return 0, "single"  # one run, no lambda: its policy was chosen on val by the script
    return min(ok, key=lambda i: val_point(sweep[i])[1]), "rule"


def block_pteenet(log: Log) -> str:
    rows, about, superseded, met_val, met_other = [], [], [], [], []
    for study in log.studies():
        rel = f"pteenet/results/{study}.json"
        doc = log.json(rel)
        if study in SUPERSEDED:
            superseded.append(f"- {link(rel, study)}: {doc.get('revision_note', '')}")
            continue
        settings = doc.get("settings", {})
        seeds = doc.get("seeds")
        seed = (f"{seeds['backbone']} / {seeds['branches']}" if isinstance(seeds, dict)
                else f"- / {settings.get('seed', '-')}")
        chosen, how = lambda_on_val(doc)
        lam_choice = (chosen_on(log, rel) or {}).get("lambda")
        order = ([chosen] if chosen is not None else []) + [
            i for i in range(len(doc["sweep"])) if i != chosen]
        for n, i in enumerate(order):
            e = doc["sweep"][i]
            acc_v, cost_v = val_point(e)
            se = e.get("drop_vs_final_exit", {}).get("test", {}).get("se_points")
            opt = (e.get("optimism") or {}).get("optimism_points")
            if study in PICKED_BY_TEST:
                mark = PICKED_BY_TEST[study]
            elif lam_choice == "test":
                mark = "lambda by test accuracy: reference only"
            elif i == chosen:
                mark = ("**val** (rule)" if how == "rule" else "**val**") + (
                    " (lambda fixed)" if lam_choice == "fixed" else "")
            else:
                mark = "not chosen"
            if e["meets_target"]:
                (met_val if mark.startswith("**val**") else met_other).append(
                    f"{study} (lambda {lam(e['lambda'])})")
            rows.append([link(rel, study) if n == 0 else "", lam(e["lambda"]), seed, mark,
                         e.get("policy", DEFAULT_POLICY), pct(acc_v), num(cost_v),
                         pct(e["test_accuracy"]),
                         points(e["drop_points"]) + ("" if se is None else f" ± {se:.2f}"),
                         num(e["avg_cost"]), "-" if opt is None else f"{opt:.2f}",
                         "met" if e["meets_target"] else "missed"])
        branch = [a for e in doc["sweep"] for a in e["exit_test_accuracy"][:-1]]
        about.append([link(rel, study), pct(doc["backbone"]["test_accuracy"]),
                      settings.get("post_epochs", doc.get("config", {}).get("trainer", {})
                                   .get("max_epochs", "-")),
                      f"{pct(min(branch), 1)}-{pct(max(branch), 1)}",
                      "unchanged" if all(e["hash_unchanged"] for e in doc["sweep"]) else "CHANGED",
                      f"{doc['posttrain_speedup']:.2f}x"])
    out = [table(["study", "lambda", "seed (backbone / branches)", "chosen", "policy (val)",
                  "val acc %", "val cost", "test acc %", "drop vs backbone (points ± SE)",
                  "test cost", "optimism (points)", "target"], rows), "",
           table(["study", "backbone test acc %", "post-training epochs", "branch test acc %",
                  "backbone hash", "post-training epoch vs joint"], about)]
    out += ["", f"Target met on test by the point chosen on val: {', '.join(met_val) or 'in no study'}; "
                f"by a point not chosen on val (reference only): {', '.join(met_other) or 'none'}.",
            "", *self_distillation(log)]
    if superseded:
        out += ["", "Not in these tables (their figures are not quoted here):", *superseded]
    return "\n".join(out)


def self_distillation(log: Log) -> list[str]:
    """Branch test accuracy of every_stage_kd against every_stage_ce, same lambda, stage by stage."""
    ce, kd = (log.json(f"pteenet/results/{s}.json") for s in ("every_stage_ce", "every_stage_kd"))
    pairs = [(a, b) for a in ce["sweep"] for b in kd["sweep"] if a["lambda"] == b["lambda"]]
    if not pairs:
        return []
    stages = pairs[0][0]["exit_stages"][:-1]
    cells = []
    for k, stage in enumerate(stages):
        diffs = [100 * (b["exit_test_accuracy"][k] - a["exit_test_accuracy"][k]) for a, b in pairs]
        cells.append(f"{stage}: {min(diffs):+.2f} to {max(diffs):+.2f}")
    return [f"Self-distillation (every_stage_kd against every_stage_ce, same lambda, "
            f"lambdas {', '.join(lam(a['lambda']) for a, _ in pairs)}): change of each branch's "
            f"test accuracy in points, by backbone stage: {'; '.join(cells)}."]


# ---- MNIST --------------------------------------------------------------------------------

def block_mnist_core(log: Log) -> str:
    rel = "mnist_core/results.json"
    doc = log.json(rel)
    plain = doc["plain"]
    seed = doc.get("seeds") or [doc["settings"]["seed"]]
    rows = [["resnet20 (no exits)", "-", "-", ", ".join(map(str, seed)), pct(plain["val"]["accuracy"]),
             pct(plain["test"]["accuracy"]), "-", "1.000", "-", "-"]]
    for r in doc["early_exit"]:
        t = r["test"]
        rows.append(["resnet20 + 2 exits", "EENets (features)" if r["head"] == "features" else "stats",
                     lam(r["lambda_coef"]), ", ".join(map(str, seed)), pct(r["val"]["accuracy"]),
                     pct(t["accuracy"]), points(r["accuracy_drop_points"]),
                     num(t["avg_cost_fraction"]), rates(t["exit_rates"]),
                     "met" if r["meets_target"] else "missed"])
    return "\n".join([
        f"{link(rel, rel)}, {doc['settings']['epochs']} epochs; how chosen: "
        f"{describe_choice(chosen_on(log, rel))}.", "",
        table(["model", "confidence head", "lambda", "seed", "val acc %", "test acc %",
               "drop vs no exits (points)", "test cost", "exit rates %",
               "target (drop <= 0.5 at cost <= 0.5)"], rows)])


def block_mnist_budget(log: Log) -> str:
    rows = []
    for rel, what in (("mnist_budget/results.json", "own final exit"),
                      ("mnist_budget/results_vs_plain.json", "resnet20 without exits (val)"),
                      ("mnist_budget/results_pool.json", "own final exit")):
        doc = log.json(rel)
        s = doc["settings"]
        chosen = doc["val_calibration"][doc["chosen_policy"]]["chosen"]
        t = doc["test"]
        rows.append([link(rel), s["exit"], f"{s['tolerance']:g} below {what}", s["seed"],
                     pct(doc["plain_test_accuracy"]), doc["chosen_policy"], pct(chosen["accuracy"]),
                     num(chosen["avg_cost"], 4), pct(t["accuracy"]), num(t["avg_cost_fraction"], 4),
                     points(doc["drop_points"]), "met" if doc["meets_target"] else "missed"])
    return "\n".join([
        "How chosen: thresholds and policy on val (the policy with the lowest val cost that "
        "meets the tolerance); only that policy is run on test.", "",
        table(["JSON", "exit heads", "tolerance (points)", "seed", "resnet20 without exits: test acc %",
               "policy (val)", "val acc %", "val cost", "test acc %", "test cost",
               "drop vs no exits (points)", "target (drop <= 0.3 at cost <= 0.25)"], rows)])


def block_tables(log: Log) -> str:
    out = []
    for name in ("eenets", "baselines", "trecx"):
        rel = f"results/{name}.json"
        doc = log.json(rel)
        seeds = doc.get("seeds") or sorted({r["seed"] for r in doc["rows"]})
        out += [f"{link(f'results/{name}.md', f'results/{name}.md')} (`make table-{name}`, "
                f"{doc['wall_s']:.0f} s; seeds {', '.join(map(str, seeds))}; how chosen: "
                f"{describe_choice(chosen_on(log, rel))})", "", doc["markdown"], ""]
    return "\n".join(out).rstrip()


# ---- T-RecX and keyword spotting ----------------------------------------------------------

def block_trecx(log: Log) -> str:
    rows, notes = [], []
    for rel in ("trecx_cifar10/results_10ep.json", "trecx_cifar10/results_20ep.json"):
        doc = log.json(rel)
        for e in doc["per_seed"]:
            for key, name in (("no_mitigation", "T-RecX"), ("mitigation", "T-RecX + mitigation")):
                m, c = e[key], e[key]["calibrated"]
                rows.append([link(rel), doc["settings"]["epochs"], e["seed"], name,
                             pct(e["plain_test_accuracy"]), pct(m["early_exit_test_accuracy"]),
                             pct(m["final_exit_test_accuracy"]), pct(c["test_accuracy"]),
                             f"{100 * c['flops_reduction']:.1f} %", pct(c["test_exit_rates"][0], 1)])
        s = doc["summary"]
        notes.append(f"- {link(rel)}: final exit, mean of seeds {', '.join(str(e['seed']) for e in doc['per_seed'])}: "
                     f"{pct(s['final_exit_accuracy_no_mitigation'], 3)} % without mitigation, "
                     f"{pct(s['final_exit_accuracy_mitigation'], 3)} % with it; "
                     f"ResNet-8 without exits {pct(s['plain_accuracy'], 3)} %.")
    fractions = log.json("trecx_cifar10/results_20ep.json")["per_seed"][0]["no_mitigation"][
        "calibrated"]["cost_fractions"]
    c, final = fractions[0], fractions[-1]
    # FLOPs reduction 1 - (f c + (1 - f) c_final) >= 0.35  <=>  f >= (c_final - 0.65) / (c_final - c)
    need = (final - 0.65) / (final - c)
    notes.append(f"- The exit costs {c:.2f} of ResNet-8's MACs, so a 35 % FLOPs reduction needs at "
                 f"least {100 * need:.0f} % of the images to leave there.")
    kws_rel = "kws_subset/results.json"
    kws = log.json(kws_rel)
    k_ee = kws["trecx_exits"][-1]
    kws_rows = [["DS-CNN (no exits)", pct(kws["plain_final_exit_accuracy"]), "1.000", "-"],
                ["DS-CNN + T-RecX exit, final exit only", pct(k_ee["test_accuracy"]),
                 num(k_ee["cost_fraction"]), "-"],
                [f"DS-CNN + T-RecX exit, thresholds on val (tolerance {kws['settings']['tolerance']:g})",
                 pct(kws["calibrated"]["accuracy"]), num(kws["calibrated"]["avg_cost_fraction"]),
                 rates(kws["calibrated"]["exit_rates"])]]
    return "\n".join([
        "How chosen: max-softmax thresholds on val, so that val accuracy stays within 1 point "
        "of ResNet-8 without exits of the same seed; every seed that ran is shown.", "",
        table(["JSON", "epochs", "seed", "network", "ResNet-8 without exits: test acc %",
               "early exit acc %", "final exit acc %", "thresholds on val: test acc %",
               "FLOPs reduction", "early exit rate %"], rows), "", *notes, "",
        f"Keyword spotting, {link(kws_rel, 'kws_subset')} ({', '.join(f'{k} {v}' for k, v in kws['splits'].items())} "
        f"clips, {kws['settings']['epochs']} epochs): ONNX runner against the engine on "
        f"{kws['onnx']['clips']} test clips: predictions equal {pct(kws['onnx']['equal_predictions'], 1)} %, "
        f"exits equal {pct(kws['onnx']['equal_exits'], 1)} %.", "",
        table(["model", "test acc %", "test cost", "exit rates %"], kws_rows)])


# ---- benchmarks and checks ----------------------------------------------------------------

def block_bench(log: Log) -> str:
    train = log.json("bench/bench_train.json")
    r = train["results"]
    plain = r["plain resnet20"]["median"]
    lines = [f"- {link('bench/bench_train.json', 'bench_train')} ({train['dataset']}, batch "
             f"{train['batch_size']}, {train['threads']} threads): plain resnet20 {plain:.0f} images/s; "
             + "; ".join(f"{k} {v['ratio_of_medians']:.2f} of it" for k, v in r.items() if v["median"] != plain)
             + "."]
    cal = log.json("bench/bench_calibration.json")
    meds = [x["median_s"] for x in cal["results"]]
    lines.append(f"- {link('bench/bench_calibration.json', 'bench_calibration')}: "
                 f"{cal['settings']['settings']:,} threshold vectors over {cal['settings']['samples']:,} "
                 f"samples in {1e3 * min(meds):.0f}-{1e3 * max(meds):.0f} ms (median per exit count and policy).")
    mem = log.json("bench/bench_memory.json")
    lines.append(f"- {link('bench/bench_memory.json', 'bench_memory')}: peak RSS "
                 f"{100 * mem['peak_growth_after_first_epoch']:+.2f} % from the first to the last of "
                 f"{len(mem['epochs'])} epochs.")
    sweep = log.json("bench/bench_sweep.json")
    lines.append(f"- {link('bench/bench_sweep.json', 'bench_sweep')}: a 3-job sweep, median wall s: "
                 + "; ".join(f"{k} {statistics.median(v):.1f}" for k, v in sweep["times_s"].items()) + ".")
    rows, chosen = [], []
    budget = {rel: log.json(rel) for rel in ("mnist_budget/results.json", "mnist_budget/results_vs_plain.json",
                                             "mnist_budget/results_pool.json")}
    for rel in ("bench/bench_inference.json", "bench/bench_inference_folded.json", "bench/bench_inference_pool.json"):
        doc = log.json(rel)
        pol = doc["policy"]
        for x in doc["results"]:
            rows.append([link(rel), "yes" if doc["settings"]["fold_bn"] else "no", x["batch_size"],
                         num(x["avg_cost_fraction"], 4), rates(x["exit_rates"]), f"{x['speedup']:.2f}x",
                         f"{x['ideal_speedup']:.2f}x", f"{x['latency_ceiling_speedup']:.2f}x",
                         f"{x['share_of_latency_ceiling']:.2f}"])
        same = [b for b, d in budget.items()
                if d["val_calibration"][d["chosen_policy"]]["chosen"]["thresholds"] == pol["thresholds"]]
        chosen.append(f"- {link(rel)}: {pol['name']} thresholds "
                      f"{' / '.join(f'{t:.3f}' for t in pol['thresholds'])} of "
                      f"`runs/mnist_budget/{Path(doc['ee_run']).name}/eval_budget`, chosen on val, as they "
                      "were when the benchmark ran: "
                      + (f"the point of {', '.join(link(b) for b in same)}." if same else
                         "the point of no current mnist_budget JSON (mnist_budget has been re-measured "
                         "since); its test accuracy is not in this JSON."))
    return "\n".join([*lines, "", "Real early exit against the plain resnet20 on the MNIST test set "
                      "(wall clock; ideal = 1 / cost; latency ceiling = what an engine without "
                      "overhead would reach, from the measured time to each exit):", "",
                      table(["JSON", "BatchNorm folded", "batch", "test cost", "exit rates %",
                             "speed-up", "ideal", "latency ceiling", "share of ceiling"], rows),
                      "", "Operating points:", *chosen])


def block_checks(log: Log) -> str:
    kr = log.json("kill_resume/results.json")
    a, b = kr["uninterrupted"], kr["killed_and_resumed"]
    onnx = log.json("onnx_equivalence/results.json")
    return "\n".join([
        f"- {link('kill_resume/results.json', 'kill_resume')} ({kr['epochs']} epochs): "
        f"{len(kr['kills'])} SIGKILLs mid-epoch (after "
        f"{' / '.join(str(k['killed_after_finished_epochs']) for k in kr['kills'])} finished epochs), each "
        f"resumed: max weight difference {kr['max_weight_difference']:g}, metrics equal: "
        f"{'yes' if kr['metrics_equal'] else 'NO'}; test {pct(a['test']['accuracy'])} % / "
        f"{pct(b['test']['accuracy'])} %, val {pct(a['val']['accuracy'])} % / {pct(b['val']['accuracy'])} % "
        f"(uninterrupted / killed and resumed; how chosen: "
        f"{describe_choice(chosen_on(log, 'kill_resume/results.json'))}).",
        f"- {link('onnx_equivalence/results.json', 'onnx_equivalence')}: ONNX runner against the PyTorch "
        f"engine on {onnx['samples']:,} test images of `{Path(onnx['run']).name}` ({onnx['policy']['name']}; how "
        f"chosen: {describe_choice(chosen_on(log, 'onnx_equivalence/results.json'))}): predictions equal "
        f"{pct(onnx['equal_predictions'])} %, exits equal "
        f"{pct(onnx['equal_exits'])} %; accuracy {pct(onnx['onnx_accuracy'])} % / {pct(onnx['torch_accuracy'])} %, "
        f"cost {num(onnx['onnx_avg_cost'])} / {num(onnx['torch_avg_cost'])} (ONNX / PyTorch)."])


# ---- certified thresholds (issue 18) -------------------------------------------------------

def block_guarantee(log: Log) -> str:
    """experiments/guarantee/: violation frequencies per model, method and alpha, checked against the targets."""
    found = [r for r in found_jsons(log.root) if r.startswith("guarantee/results_") and "estimate" not in r]
    out = []
    for rel in found:
        doc = log.json(rel)
        s = doc["settings"]
        delta = s["delta"]
        for name, m in doc["models"].items():
            reps = m["repeats"]
            se_delta = math.sqrt(delta * (1 - delta) / reps)
            checks = []
            for a, res in m["results"].items():
                alpha = float(a)
                meth = res["methods"]
                for k in ("ltt", "ucb"):
                    if k in meth:
                        f = meth[k]["violation_freq"]
                        checks.append(f"{k} at {100 * alpha:g} points: violation {f:.3f} "
                                      f"{'<=' if f <= delta + 2 * se_delta else '>'} delta + 2 SE = "
                                      f"{delta + 2 * se_delta:.3f}")
                if "crc" in meth:
                    r = meth["crc"]["mean_risk"]
                    checks.append(f"crc at {100 * alpha:g} points: mean risk {100 * r:.3f} points "
                                  f"{'<=' if r <= alpha else '>'} alpha")
            ok = sum("<=" in c for c in checks)
            one = m["results"].get("0.01", {}).get("methods", {})
            ratio = "; ".join(f"{k} {one[k]['mean_cost'] / one['empirical']['mean_cost']:.3f}x"
                              for k in ("ltt", "ucb", "crc") if k in one and "empirical" in one)
            out += [f"{link(rel, rel)}: `{Path(m['run']).name}`, population N = {m['N']:,} "
                    f"(val {m['n_val']:,} + test {m['n_test']:,}), calibration sets of n = {m['n']:,} drawn "
                    f"with replacement, {reps:,} repeats (slow searches: {m['optimism_repeats']}), "
                    f"policy {s['policy']}, risk {s['risk']}, delta {delta:g}; final exit on the population "
                    f"{pct(m['final_exit_accuracy_population'])} %. Targets met: {ok} of {len(checks)}"
                    + ("" if ok == len(checks) else
                       " (not met: " + "; ".join(c for c in checks if "<=" not in c) + ")") + "."
                    + (f" Mean cost of the certified point against the uncorrected search's at alpha = 1 "
                       f"point: {ratio}." if ratio else ""), ""]
        out += [doc["table"], ""]
    for rel in [r for r in found_jsons(log.root) if r.startswith("guarantee/bench")]:
        doc = log.json(rel)
        s = doc["settings"]
        rows = [[Path(r["run"]).name, r["method"], f"{r['samples']:,}", f"{r['median_s']:.3f}",
                 num(r["avg_cost"], 4)] for r in doc["results"]]
        out += [f"{link(rel, rel)}: one calibration on {s['samples']:,} samples, median of {s['reps']}, "
                f"{s['threads']} torch thread(s), {doc['machine']['cpu']}, alpha {s['alpha']:g}, "
                f"delta {s['delta']:g}, policy {s['policy']}.", "",
                table(["run", "method", "samples", "median s", "avg cost"], rows), ""]
    return "\n".join(out).rstrip() or "No guarantee results committed yet."


def found_jsons(root: Path) -> list[str]:
    """Every result JSON under ``root``, run folders, smoke outputs and caches left out.

    In a git checkout, the JSONs git tracks (a result still being written in a shared
    working tree is not part of the log until it is committed); elsewhere every file.
    """
    skip = {"runs", "smoke", "__pycache__"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", "*.json"],
                              capture_output=True, text=True, timeout=60, env=env)
        tracked = proc.stdout.split("\0") if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        tracked = None
    rels = ([r for r in tracked if r] if tracked is not None
            else [str(p.relative_to(root)) for p in root.rglob("*.json")])
    return sorted(r for r in rels if not skip & set(Path(r).parts))


def block_provenance(log: Log, tabulated: list[str]) -> str:
    found = found_jsons(log.root)
    rows = []
    for rel in sorted(set(tabulated) | set(found)):
        doc = log.json(rel)
        rev = doc.get("revision")
        if rev and rev.get("commit"):
            r = f"`{rev['commit'][:10]}`" + (f", dirty ({rev['changed_count']} paths)" if rev.get("dirty") else "")
            if rev.get("commit_at_save") not in (None, rev["commit"]):
                r += f"; HEAD `{rev['commit_at_save'][:10]}` when saved"
        elif rev:
            r = f"not recorded: {rev.get('note')}"
        else:
            r = doc.get("revision_note", "not recorded")
        seeds = doc.get("seeds")
        if seeds is None:  # older JSONs: the seed among the settings, or each row's
            s = doc.get("settings", {})
            seeds = s.get("seeds", s.get("seed"))
            if seeds is None and "rows" in doc:
                seeds = sorted({r["seed"] for r in doc["rows"]})
        machine = doc.get("machine", {})
        rows.append([link(rel, rel), doc.get("finished", "-"),
                     f"{machine.get('cpu', '-')}; torch threads: {machine.get('torch_threads', '-')}",
                     "-" if seeds is None else json.dumps(seeds), describe_choice(chosen_on(log, rel)), r])
    out = table(["JSON", "finished", "CPU", "seeds", "how chosen", "revision"], rows)
    others = [link(rel, rel) for rel in found if rel not in tabulated]
    if others:
        out += f"\n\nNot tabulated in this log (their figures are in the JSON only): {', '.join(others)}."
    return out


BLOCKS: dict[str, Callable[[Log], str]] = {
    "mnist_core": block_mnist_core, "mnist_budget": block_mnist_budget, "tables": block_tables,
    "pteenet": block_pteenet, "trecx": block_trecx, "bench": block_bench, "checks": block_checks,
    "guarantee": block_guarantee,
}


def render(root: Path) -> dict[str, str]:
    """Every block's text, from the JSONs under ``root``; the provenance of every JSON read last."""
    log = Log(root)
    out = {name: fn(log) for name, fn in BLOCKS.items()}
    out["provenance"] = block_provenance(log, log.read())
    return out


def rewrite(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- results:NAME -->`` block replaced by ``blocks[NAME]``."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
        if len(pattern.findall(text)) != 1:
            raise LogError(f"README.md needs exactly one '<!-- results:{name} -->' ... "
                           f"'<!-- /results:{name} -->' block")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def check(root: Path) -> str | None:
    """None if ``root``/README.md equals its regeneration, else one line naming the first difference."""
    readme = root / "README.md"
    old = readme.read_text()
    new = rewrite(old, render(root))
    if old == new:
        return None
    a, b = old.splitlines(), new.splitlines()
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    x, y = (a[n] if n < len(a) else ""), (b[n] if n < len(b) else "")
    c = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    start = max(0, c - 30)  # the first differing character, with some context
    return (f"{readme} differs from its JSONs at line {n + 1}, column {c + 1} (README: "
            f"{x[start:c + 40]!r}; JSONs give: {y[start:c + 40]!r}); run python experiments/results_log.py")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/results_log.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 with one line if README.md differs")
    p.add_argument("--root", type=Path, default=HERE, help="folder of README.md and the JSONs")
    args = p.parse_args(argv)
    try:
        if args.check:
            diff = check(args.root)
            if diff:
                print(f"error: {diff}", file=sys.stderr)
                return 1
            return 0
        readme = args.root / "README.md"
        old = readme.read_text()
        new = rewrite(old, render(args.root))
        if new != old:
            atomic_write_text(readme, new)
        print(f"{readme}: {'rewritten' if new != old else 'unchanged'}")
        return 0
    except (LogError, OSError, KeyError, ValueError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        print(f"error: {what}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
