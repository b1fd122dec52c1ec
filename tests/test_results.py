"""Typed results: one vocabulary from the metrics to results.json, files of older and newer eenets."""

from __future__ import annotations

import json
import math
import subprocess
import types
from pathlib import Path

import pytest
import torch

import eenet
from eenet.cost import CostTable, ExitCost
from eenet.errors import EENetError
from eenet.models.early_exit import ExitOutputs
from eenet.policies import ConfidencePolicy
from eenet.reporting.markdown import results_markdown
from eenet.reporting.results import (FORMAT_VERSION, PLAIN_FORMAT, EngineResult, EvaluationRecord, RunResults,
                                     SplitResult, TrainingRecord, check_readable,
                                     check_results_file, finished_run_results, write_results)
from eenet.training.metrics import ExitMetrics, flat_log_dict

REPO = Path(__file__).resolve().parents[1]
#: the commit before typed results: its results.py wrote results.json with plain dicts
PREVIOUS = "0b1432b"

# A fixed example: a cost table of three exits and what a policy gave on val and test.
COST = CostTable(backbone_macs=2_558_000, input_size=(1, 8, 8), exits=[
    ExitCost("exit0", 0, 10_243, 320_515, 320_515 / 2_558_000),
    ExitCost("exit1", 1, 10_243, 629_766, 629_766 / 2_558_000),
    ExitCost("exit2", 8, 896, 2_578_822, 2_578_822 / 2_558_000)])
VAL = dict(accuracy=0.97685, avg_cost_fraction=0.19871, exit_rates=[0.889, 0.032, 0.079], n=216,
           exit_accuracy=[0.93981, 0.96296, 0.98148])
TEST = dict(accuracy=0.96667, avg_cost_fraction=0.17812, exit_rates=[0.878, 0.072, 0.05], n=360,
            exit_accuracy=[0.95556, 0.97222, 0.96667], overthinking=[0.01389, 0.01667, 0.0],
            oracle_acc=0.98333)
TRAIN_TEST = dict(TEST, mixture_acc=0.96944, expected_cost=0.21)
CONFIG = {"seed": 0, "placement": {"method": "fine", "num_exits": 2, "stages": None}}
TRAINING = dict(splits={"train": 1221, "val": 216, "test": 360}, epochs=8,
                best_checkpoint="/runs/demo/checkpoints/best.ckpt", resumed_from=None,
                world_size=1, mode="joint", targets="labels", backbone_hash_before="ab12",
                backbone_hash_after="cd34", train_epoch_seconds=[1.1, 1.2])
EVALUATION = dict(run="/runs/demo", target={"kind": "budget", "value": 0.2},
                  calibration={"policy": "confidence", "reachable": True,
                               "chosen": {"thresholds": [0.75, "inf"], "accuracy": 0.97685,
                                          "avg_cost": 0.19871, "exit_rates": [0.9, 0.1, 0.0]}},
                  drop_vs_final_exit={"test": {"drop_points": 0.0, "se_points": 0.5,
                                               "discordant": 0.01}})
ENGINE = {"batch_size": 256, "wall_s": 0.09, "agreement_with_static": 1.0}


def _old_vocabulary(split: dict) -> dict:
    """A split as the previous code's ExitMetrics / eenet-eval handed it to make_results."""
    old = {"acc": split["accuracy"], "avg_cost": split["avg_cost_fraction"],
           "exit_rates": split["exit_rates"], "n": split["n"], "exit_acc": split["exit_accuracy"]}
    if "overthinking" in split:
        old["overthinking"] = split["overthinking"]
    for key in ("mixture_acc", "expected_cost", "oracle_acc"):
        if key in split:
            old[key] = split[key]
    return old


@pytest.fixture(scope="module")
def previous_make_results():
    """``make_results`` of the previous code, run from its own source (``git show``)."""
    try:
        source = subprocess.run(["git", "show", f"{PREVIOUS}:eenet/reporting/results.py"],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git history with commit {PREVIOUS} (a shallow clone or an archive has "
                    f"none): the results.json files its code wrote cannot be remade")
    module = types.ModuleType("previous_results")
    exec(compile(source, f"{PREVIOUS}:eenet/reporting/results.py", "exec"), module.__dict__)
    return module.make_results


def _previous_training_file(make_results) -> dict:
    """results.json as the previous eenet-train wrote it (its calls, in its order)."""
    results = make_results(
        dataset="digits", backbone="resnet20", num_classes=10, cost=COST,
        val={**_old_vocabulary(VAL), "loss": 0.31}, test={**_old_vocabulary(TRAIN_TEST),
                                                           "loss": 0.35},
        policy={"name": "confidence", "thresholds": 0.5}, config=CONFIG,
        splits=TRAINING["splits"], epochs=8, best_checkpoint=TRAINING["best_checkpoint"],
        val_loss=0.31, test_loss=0.35, resumed_from=None, world_size=1, mode="joint",
        targets="labels", backbone_hash_before="ab12", backbone_hash_after="cd34",
        train_epoch_seconds=[1.1, 1.2])
    results.update({"anytime": {"policy": "confidence", "auc": 0.85}})
    results["wall_s"] = 14.5
    return results


def _previous_evaluation_file(make_results) -> dict:
    """results.json as the previous eenet-eval wrote it (with latency=true)."""
    results = make_results(
        dataset="digits", backbone="resnet20", num_classes=10, cost=COST,
        val=_old_vocabulary(VAL), test=_old_vocabulary(TEST),
        policy={"name": "confidence", "thresholds": [0.75, "inf"]}, config=CONFIG,
        run=EVALUATION["run"], target=EVALUATION["target"],
        calibration=EVALUATION["calibration"], engine=ENGINE,
        drop_vs_final_exit=EVALUATION["drop_vs_final_exit"])
    results["latency"] = [{"exit": "exit0", "batch_size": 1, "ms_per_batch": 0.2}]
    return results


def _new_split(values: dict, loss: float | None = None) -> SplitResult:
    return SplitResult(**values, loss=loss)


def _latency_as_a_mapping(old: dict) -> dict:
    """The previous file as this eenet reads it: its latency list (the eager per-exit table of
    ``latency=true``) becomes the ``exit_table`` of the latency mapping, nothing else moves."""
    return {k: {"exit_table": v} if k == "latency" else v for k, v in old.items()}


def test_files_of_the_previous_code_round_trip_unchanged(previous_make_results):
    """Unchanged but for the latency list, read as the mapping every file now has."""
    for old in (_previous_training_file(previous_make_results),
                _previous_evaluation_file(previous_make_results)):
        typed = RunResults.from_dict(json.loads(json.dumps(old)))
        assert typed.format_version is None  # written before format_version: format 0
        again = typed.to_dict()
        expected = _latency_as_a_mapping(old)
        assert again == expected
        assert json.dumps(again, indent=2) == json.dumps(expected, indent=2)  # key order too
    assert isinstance(old["latency"], list)  # the evaluation file had the list
    assert typed.latency == {"exit_table": old["latency"]}


def test_the_new_writer_writes_the_previous_layout_plus_the_version(previous_make_results):
    """Built from the same figures in the new vocabulary: the same file, two keys added."""
    # a file without temperatures keeps format 2's layout and number (PLAIN_FORMAT)
    versions = {"format_version": PLAIN_FORMAT, "eenet_version": eenet.__version__}
    train = RunResults.build(  # training: the mixture and oracle figures on both splits
        "digits", "resnet20", 10, COST,
        _new_split(dict(VAL, mixture_acc=0.97, expected_cost=0.2, oracle_acc=0.99), 0.31),
        _new_split(TRAIN_TEST, 0.35),
        {"name": "confidence", "thresholds": 0.5}, CONFIG,
        training=TrainingRecord(**TRAINING), anytime={"policy": "confidence", "auc": 0.85},
        wall_s=14.5)
    assert train.to_dict() == {**versions, **_previous_training_file(previous_make_results)}
    ev = RunResults.build(
        "digits", "resnet20", 10, COST, _new_split(VAL), _new_split(TEST),
        {"name": "confidence", "thresholds": [0.75, "inf"]}, CONFIG,
        evaluation=EvaluationRecord(engine=EngineResult(**ENGINE), **EVALUATION),
        latency={"exit_table": [{"exit": "exit0", "batch_size": 1, "ms_per_batch": 0.2}]})
    assert ev.to_dict() == {**versions, **_latency_as_a_mapping(
        _previous_evaluation_file(previous_make_results))}
    assert list(ev.to_dict())[:2] == ["format_version", "eenet_version"]


def test_a_new_file_round_trips_and_writes_its_markdown(tmp_path):
    engine = EngineResult(**ENGINE, dynamic_wall_s=0.045, final_exit_wall_s=0.099,
                          speedup=0.099 / 0.045, timed_passes=3, threads=1,
                          dynamic_pass_s=[0.04, 0.045, 0.05], final_exit_pass_s=[0.09, 0.099, 0.1])
    results = RunResults.build(
        "digits", "resnet20", 10, COST, _new_split(VAL), _new_split(TEST),
        {"name": "confidence", "thresholds": [0.75, "inf"]}, CONFIG,
        evaluation=EvaluationRecord(engine=engine, **EVALUATION))
    js, md = write_results(tmp_path, results)
    saved = json.loads(js.read_text())
    assert RunResults.from_dict(saved) == results
    assert saved["engine"]["final_exit_wall_s"] == 0.099 and saved["engine"]["timed_passes"] == 3
    text = md.read_text()
    assert text == results_markdown(saved) + "\n" == results_markdown(results) + "\n"
    assert "dynamic engine 0.0450 s" in text and "0.0990 s: 2.20x faster" in text
    # the per-exit accuracies live once, in the exit rows, and come back into the splits
    assert [e["test_accuracy"] for e in saved["exits"]] == TEST["exit_accuracy"]
    assert RunResults.from_dict(saved).test.overthinking == TEST["overthinking"]


def _tail(mean, p50, p95, p99, top, backend="onnxruntime"):
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": top, "mean_ms": mean,
            "backend": backend, "samples": 360}


#: a latency section as eenet-eval writes it with budget_ms and budget_p95_ms
LATENCY = {**_tail(0.25, 0.21, 0.48, 0.61, 0.9), "batch_size": 1, "threads": 2,
           "exit_ms": [0.22, 0.47, 0.8], "plain": _tail(0.52, 0.5, 0.55, 0.6, 0.7),
           "speedup": 0.52 / 0.25, "speedup_p95": 0.55 / 0.48,
           "expected": {"mean_ms_val": 0.24, "p95_ms_val": 0.45, "mean_ms_test_rates": 0.245,
                        "p95_ms_test_rates": 0.45, "measured_mean_ms": 0.25,
                        "measured_p95_ms": 0.48, "measured_over_expected": 0.25 / 0.24,
                        "measured_p95_over_expected": 0.48 / 0.45},
           "budget": {"budget_ms": 0.3, "budget_p95_ms": 0.5, "expected_mean_ms": 0.24,
                      "expected_p95_ms": 0.45, "measured_mean_ms": 0.25, "measured_p95_ms": 0.48,
                      "measured_within_budget": True, "measured_p95_within_budget": True,
                      "test_accuracy": 0.96667}}


def test_results_md_states_the_measured_latency(tmp_path):
    engine = EngineResult(**ENGINE, dynamic_wall_s=0.045, final_exit_wall_s=0.099,
                          speedup=0.099 / 0.045, timed_passes=3, threads=1,
                          dynamic_pass_s=[0.04, 0.045, 0.05], final_exit_pass_s=[0.09, 0.099, 0.1])

    def markdown(latency):
        results = RunResults.build(
            "digits", "resnet20", 10, COST, _new_split(VAL), _new_split(TEST),
            {"name": "confidence", "thresholds": [0.75, "inf"]}, CONFIG,
            evaluation=EvaluationRecord(engine=engine, **EVALUATION), latency=latency)
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        return write_results(folder, results)[1].read_text()

    plain = markdown(None)
    # the eager exit table alone is no per-sample latency: no lines about it
    assert markdown({"exit_table": [{"exit": "exit0", "batch_size": 1, "ms_per_batch": 0.2}]}) \
        == plain
    assert "latency" not in plain and "budget" not in plain
    text = markdown(LATENCY)
    new = [line for line in text.splitlines() if line not in plain.splitlines()]
    assert new == [
        "Per-sample latency on test, batch 1, engine=onnxruntime (360 samples, 2 thread(s), "
        "interleaved with the plain run): mean 0.2500 ms, p50 0.2100, p95 0.4800, p99 0.6100, "
        "max 0.9000 ms.",
        "The plain run (every early exit off, engine=onnxruntime): mean 0.5200 ms, p50 0.5000, "
        "p95 0.5500, p99 0.6000, max 0.7000 ms: measured speed-up 2.08x (mean), 1.15x (p95).",
        "Calibrated on val with measured latencies as the cost: expected mean 0.2400 ms (p95 "
        "0.4500), measured 0.2500 ms (p95 0.4800): 1.042x the expectation (1.067x for the p95).",
        "budget_ms=0.3 and budget_p95_ms=0.5: expected mean 0.2400 ms, p95 0.4500 ms on val; "
        "measured on test mean 0.2500 ms (within the budget), p95 0.4800 ms (within the p95 "
        "budget), test accuracy 96.67%."]
    assert text.splitlines()[-1] == plain.splitlines()[-1]  # the engine timing stays last
    assert "2.20x faster" in text.splitlines()[-1]
    # a p95 budget alone, over it on test: said so, and no mean budget is claimed
    only = {k: v for k, v in LATENCY["budget"].items()
            if k not in ("budget_ms", "measured_within_budget")}
    text = markdown({**LATENCY, "budget": {**only, "measured_p95_within_budget": False}})
    assert ("budget_p95_ms=0.5: expected mean 0.2400 ms, p95 0.4500 ms on val; measured on test "
            "mean 0.2500 ms, p95 0.4800 ms (over the p95 budget)") in text
    assert "budget_ms" not in text.replace("budget_p95_ms", "")


def _current() -> dict:
    return RunResults.build("digits", "resnet20", 10, COST, _new_split(VAL), _new_split(TEST),
                            {"name": "confidence", "thresholds": 0.5}, CONFIG).to_dict()


@pytest.mark.parametrize("change,message", [
    ({"format_version": FORMAT_VERSION + 1},
     f"format {FORMAT_VERSION + 1}, this eenet reads up to {FORMAT_VERSION}); upgrade eenet"),
    ({"energy_joules": 1.5},
     f"format {PLAIN_FORMAT}, this eenet reads up to {FORMAT_VERSION}; keys it does not know: "
     f"energy_joules); upgrade eenet"),
])
def test_a_file_of_a_newer_eenet_is_refused(change, message):
    newer = {**_current(), **change}
    with pytest.raises(EENetError) as err:
        RunResults.from_dict(newer, where="RUN")
    assert str(err.value) == f"RUN was written by a newer eenet ({message}"
    with pytest.raises(EENetError, match="newer eenet"):
        check_readable(newer, "RUN")


def test_files_this_eenet_reads_pass_and_malformed_ones_are_one_line(tmp_path):
    check_readable(_current(), "RUN")
    old = _current()
    del old["format_version"], old["eenet_version"]
    check_readable(old, "RUN")  # before format_version: format 0
    for bad, message in (({**_current(), "format_version": "2"}, "must be an integer"),
                         ({**_current(), "format_version": True}, "must be an integer"),
                         ([1, 2], "does not hold a results mapping")):
        with pytest.raises(EENetError, match=message):
            check_readable(bad, "RUN")
    missing = _current()
    del missing["val"]
    with pytest.raises(EENetError, match="RUN is not an eenet results file: 'val' is missing"):
        RunResults.from_dict(missing, where="RUN")
    check_results_file(tmp_path)  # no results.json: nothing to check
    (tmp_path / "results.json").write_text('{"dataset": ')
    with pytest.raises(EENetError, match=r"cannot read .*results.json: ") as err:
        check_results_file(tmp_path)
    assert "\n" not in str(err.value)


def test_split_result_from_counts_is_the_documented_formula():
    counts = torch.tensor([5, 3, 2])
    costs = [0.2, 0.5, 1.0]
    r = SplitResult.from_counts(counts, 7, costs, exit_correct=torch.tensor([6, 8, 9]),
                                overthink=torch.tensor([1, 0, 0]), oracle_correct=10)
    assert r.n == 10 and r.accuracy == 0.7
    assert r.avg_cost_fraction == pytest.approx((5 * 0.2 + 3 * 0.5 + 2 * 1.0) / 10)
    assert r.exit_rates == [0.5, 0.3, 0.2] and r.exit_accuracy == [0.6, 0.8, 0.9]
    assert r.overthinking == [0.1, 0.0, 0.0] and r.oracle_acc == 1.0
    assert r.mixture_acc is None and r.loss is None


def test_training_metrics_speak_the_results_vocabulary():
    """ExitMetrics on a hand-made batch gives the SplitResult worked out by hand."""
    # 4 samples, 2 classes, exits 0, 1 and the final exit; target = class 0 for all
    logits = [torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]),   # right: 0, 2
              torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]),   # right: 0, 1
              torch.tensor([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])]   # right: 1, 2
    # confidence h = sigmoid(z) > 0.5 leaves: sample 0 at exit 0, sample 1 at exit 1,
    # samples 2 and 3 go on to the final exit
    conf = [torch.tensor([3.0, -3.0, -3.0, -3.0]), torch.tensor([0.0, 3.0, -3.0, -3.0]),
            torch.full((4,), math.inf)]
    metric = ExitMetrics([0.2, 0.5, 1.0], ConfidencePolicy(0.5), mixture=False)
    metric.update(ExitOutputs(logits, conf), torch.zeros(4, dtype=torch.long))
    r = metric.compute()
    assert isinstance(r, SplitResult)
    assert r.exit_rates == [0.25, 0.25, 0.5]
    assert r.accuracy == 3 / 4                         # samples 0 (exit 0), 1 (exit 1), 2 (final)
    assert r.avg_cost_fraction == pytest.approx((0.2 + 0.5 + 2 * 1.0) / 4)
    assert r.exit_accuracy == [0.5, 0.5, 0.5]
    assert r.overthinking == [0.25, 0.25, 0.0]         # sample 0: right early, wrong at the final
    assert r.oracle_acc == 3 / 4                       # sample 3 is wrong everywhere
    logged = flat_log_dict("val", r)
    assert logged["val/acc"] == r.accuracy and logged["val/avg_cost"] == r.avg_cost_fraction
    assert [logged[f"val/exit{i}/rate"] for i in range(3)] == r.exit_rates
    assert [logged[f"val/exit{i}/acc"] for i in range(3)] == r.exit_accuracy
    assert "val/exit2/overthinking" not in logged and "val/mixture_acc" not in logged
    assert "val/exit0/overthinking" in logged



def test_finished_run_results_reads_a_finished_run_and_refuses_the_rest_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(EENetError, match=r"results.json cannot be read .*\(FileNotFoundError\)"):
        finished_run_results(run)
    for text, error in (("{", "JSONDecodeError"), ('{"exits": []}', "KeyError"),
                        ('{"exits": [{"val_accuracy": 0.5}]}', "KeyError"),
                        ('{"exits": 3}', "TypeError")):
        (run / "results.json").write_text(text)
        with pytest.raises(EENetError, match=rf"cannot be read as a finished run's results \({error}\)"):
            finished_run_results(run)
    good = {"exits": [{"test_accuracy": 0.5}, {"test_accuracy": 0.9}], "test": {}}
    (run / "results.json").write_text(json.dumps(good))
    assert finished_run_results(run) == good
    (run / "INCOMPLETE").write_text("")  # being trained: refused however good its file
    with pytest.raises(EENetError, match="still being trained"):
        finished_run_results(run)
