"""eenet-eval with engine backends, latency as the cost, budget_ms and the latency section
(issue 19): every backend's evaluation gives eager's exits and predictions, the section's
fields and their order, budget_ms kept in expectation on val, bad values in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eenet.config import compose_config
from eenet.data.batching import make_loader
from eenet.inference import create_engine
from eenet.inference.latency import TAIL_KEYS
from eenet.jobs.evaluate import evaluate, report
from eenet.jobs.train import train
from eenet.policies import create_policy
from eenet.reporting.results import RunResults
from eenet.runs import load_run
from folder_state import snapshot  # tests/ is on sys.path
from test_bad_input import _expect_one_line_exit

BACKENDS = ("eager", "compiled", "onnxruntime")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("digits_run")
    train(compose_config(["trainer.max_epochs=3", "trainer.enable_progress_bar=false",
                          "logger=none", "threads=1"], output_dir=out))
    torch.set_num_threads(before)
    return out


def eval_config(run, out, *overrides):
    return compose_config([f"run={run}", "threads=1", *overrides], output_dir=out,
                          config_name="eval")


@pytest.fixture(scope="module")
def evaluations(digits_run, tmp_path_factory):
    """One evaluation per backend, the same MACs target (so the same thresholds; tolerance 0
    sends this model's test samples to every exit)."""
    out = {}
    for backend in BACKENDS:
        folder = tmp_path_factory.mktemp(f"eval_{backend}")
        out[backend] = evaluate(eval_config(digits_run, folder, "tolerance=0", "policy=max_prob",
                                            f"engine={backend}", "tail_latency=true",
                                            "latency_samples=40", "timing_passes=1"))
        out[backend]["folder"] = folder
    return out


def per_sample(net, cost, policy, backend, cache, batches):
    eng = create_engine(net, policy, cost, backend=backend, cache_dir=cache)
    outs = [eng(x) for x in batches]
    return torch.cat([o.exit for o in outs]), torch.cat([o.pred for o in outs])


def static_scores(steps, batches):
    """Every early exit's max_prob score through a backend's steps (B, N)."""
    rows = []
    with torch.inference_mode():
        for x in batches:
            live, scores = (x,), []
            for step in steps[:-1]:
                live = step.body(live)
                logits, _, live = step.head(live)
                scores.append(torch.softmax(logits, 1).max(1).values)
            rows.append(torch.stack(scores, 1))
    return torch.cat(rows)


def test_every_backend_evaluates_as_eager(digits_run, evaluations):
    _, dm, net, cost = load_run(digits_run)
    bs = 256
    batches = [x for x, _ in make_loader(dm.test_dataset, bs, shuffle=False)]
    y = torch.cat([t for _, t in make_loader(dm.test_dataset, bs, shuffle=False)])
    thresholds = evaluations["eager"]["policy"]["thresholds"]
    policy = create_policy("max_prob", [float(t) for t in thresholds])
    ref_exit, ref_pred = per_sample(net, cost, policy, "eager", None, batches)
    assert ref_exit.unique().numel() >= 2, "the thresholds must send samples to several exits"
    eager_scores = static_scores(create_engine(net, policy, cost).steps, batches)
    thr = torch.tensor([float(t) for t in thresholds])
    for backend, res in evaluations.items():
        assert res["policy"]["thresholds"] == thresholds  # MACs: the same calibration
        assert res["latency"]["backend"] == backend
        cache = digits_run / "engine_cache" / backend if backend != "eager" else None
        exit_idx, pred = per_sample(net, cost, policy, backend, cache, batches)
        # the evaluation's test figures are this backend's run
        n = len(y)
        rates = (torch.bincount(exit_idx, minlength=net.num_exits).double() / n).tolist()
        assert res["test"]["exit_rates"] == pytest.approx(rates, abs=0.5 / n)
        assert res["test"]["accuracy"] == pytest.approx(float((pred == y).double().mean()),
                                                        abs=0.5 / n)
        # against eager: equal except where rounding can move a score across its threshold,
        # within 4x the largest score difference measured here between the two backends
        steps = create_engine(net, policy, cost, backend=backend, cache_dir=cache).steps
        margin = 4 * float((static_scores(steps, batches) - eager_scores).abs().max())
        near = ((eager_scores - thr).abs() <= margin).any(1)
        far = ~near
        assert torch.equal(exit_idx[far], ref_exit[far]), backend
        assert torch.equal(pred[far], ref_pred[far]), backend
        # not a vacuous comparison: every exit eager uses is among the compared samples
        assert set(ref_exit[far].tolist()) == set(ref_exit.tolist())


def test_latency_section_fields_and_order(evaluations):
    for backend, res in evaluations.items():
        lat = res["latency"]
        for part in (lat, lat["plain"]):
            assert set(TAIL_KEYS) <= set(part)
            assert part["backend"] == backend and part["samples"] == 40
            assert 0 < part["p50_ms"] <= part["p95_ms"] <= part["p99_ms"] <= part["max_ms"]
            assert 0 < part["mean_ms"] <= part["max_ms"]
        assert lat["batch_size"] == 1 and lat["threads"] == 1
        assert lat["speedup"] == lat["plain"]["mean_ms"] / lat["mean_ms"]
        assert lat["speedup_p95"] == lat["plain"]["p95_ms"] / lat["p95_ms"]
        assert "expected" not in lat and "budget" not in lat  # MACs were the cost
        # the file holds it, is read back, and the printed report states it
        folder = res["folder"]
        saved = json.loads((folder / "results.json").read_text())
        assert saved["latency"] == lat
        assert json.loads((folder / "latency.json").read_text()) == lat
        assert RunResults.from_dict(saved).to_dict() == saved
        text = report(saved)
        assert f"engine={backend}" in text and f"p95 {lat['p95_ms']:.4f}" in text
        assert f"measured speed-up {lat['speedup']:.2f}x" in text


@pytest.fixture(scope="module")
def latency_costs(digits_run, tmp_path_factory):
    """The per-exit times on this machine: an evaluation with latency as the cost."""
    return evaluate(eval_config(digits_run, tmp_path_factory.mktemp("latency_costs"),
                                "tolerance=1", "cost=latency", "policy=max_prob",
                                "latency_samples=20", "timing_passes=0"))


def test_budget_ms_is_kept_in_expectation_on_val(digits_run, latency_costs, tmp_path):
    first = latency_costs
    ms = first["latency"]["cost_tables"]["1"]["ms"]
    assert first["target"]["final_exit_ms"] == ms[-1]
    budget = (ms[0] + ms[-1]) / 2  # between every sample at exit 0 and every one at the end
    res = evaluate(eval_config(digits_run, tmp_path / "b", f"budget_ms={budget}",
                               "policy=max_prob", "latency_samples=20", "timing_passes=0"))
    table = res["latency"]["cost_tables"]["1"]
    target = res["target"]
    assert target["kind"] == "budget_ms" and target["value"] == budget
    assert res["calibration"]["reachable"] is True
    # expected time per sample, recomputed from the recorded table and val's exit rates:
    # sum_i rate_i x (ms_i - what the idle heads before exit i save)
    thr = [float(t) for t in res["policy"]["thresholds"]]
    idle = [math.isinf(t) and t > 0 and s for t, s in zip(thr, table["skippable"])]
    saved = [sum(h for h, i in zip(table["head_ms"][:e], idle[:e]) if i)
             for e in range(len(table["ms"]))]
    rates = res["val"]["exit_rates"]
    expected = sum(r * (m - s) for r, m, s in zip(rates, table["ms"], saved))
    assert target["expected_ms"] == pytest.approx(expected, rel=1e-9)
    assert expected <= budget
    # the most accurate point within the budget: no point of the val Pareto front that fits
    # is more accurate (its costs are in units of the final exit's time)
    fits = [p["accuracy"] for p in res["calibration"]["pareto"]
            if p["avg_cost"] * table["ms"][-1] <= budget + 1e-12]
    assert fits and res["val"]["accuracy"] >= max(fits)
    # and the calibrated expectation stands next to the measured time
    b = res["latency"]["budget"]
    assert b["budget_ms"] == budget and b["expected_mean_ms"] == target["expected_ms"]
    assert b["measured_mean_ms"] == res["latency"]["mean_ms"]
    assert b["test_accuracy"] == res["test"]["accuracy"]
    assert res["latency"]["expected"]["measured_over_expected"] == \
        res["latency"]["mean_ms"] / target["expected_ms"]
    # the val section keeps MAC fractions (the idle heads' MACs left out, as in the engine)
    ex = res["exits"]
    macs = [e["macs"] - sum(h["head_macs"] for h, i in zip(ex[:k], idle[:k]) if i)
            for k, e in enumerate(ex)]
    assert res["val"]["avg_cost_fraction"] == pytest.approx(
        sum(r * m for r, m in zip(rates, macs)) / res["backbone_macs"], rel=1e-9)


def test_budget_p95_ms_with_budget_ms(digits_run, latency_costs, tmp_path):
    """Both budgets: the expected mean and p95 on val are within them, and each stands next to
    what the dynamic run measured on test, in results.json, results.md and the report."""
    ms = latency_costs["latency"]["cost_tables"]["1"]["ms"]
    # between every sample at exit 0 and every one at the end: the p95 has room below the
    # final exit only if at most 5 % of val's samples go there; the mean a little more
    p95_budget, mean_budget = (ms[0] + ms[-1]) / 2, (ms[0] + 2 * ms[-1]) / 3
    out = tmp_path / "b"
    res = evaluate(eval_config(digits_run, out, f"budget_ms={mean_budget}",
                               f"budget_p95_ms={p95_budget}", "policy=max_prob",
                               "latency_samples=20", "timing_passes=0"))
    target, lat = res["target"], res["latency"]
    assert target["kind"] == "budget_ms" and target["value"] == mean_budget
    assert target["budget_p95_ms"] == p95_budget and res["calibration"]["reachable"] is True
    assert target["expected_ms"] <= mean_budget and target["expected_p95_ms"] <= p95_budget
    # the section's p95 from the recorded table (LatencyCostTable.expected_percentile_ms,
    # given the engine's idle exits) is the calibrator's own figure
    exp = lat["expected"]
    assert exp["p95_ms_val"] == pytest.approx(target["expected_p95_ms"], rel=1e-12)
    assert exp["measured_p95_ms"] == lat["p95_ms"]
    assert exp["measured_p95_over_expected"] == lat["p95_ms"] / exp["p95_ms_val"]
    # and under test's exit rates: the smallest exit time (idle heads before it left out)
    # whose exits at or below it take >= 95 % of the test samples
    table = lat["cost_tables"]["1"]
    thr = [float(t) for t in res["policy"]["thresholds"]]
    idle = [math.isinf(t) and t > 0 and s for t, s in zip(thr, table["skippable"])]
    times = [m - sum(h for h, i in zip(table["head_ms"][:e], idle[:e]) if i)
             for e, m in enumerate(table["ms"])]
    n = res["test"]["n"]
    counts = [round(r * n) for r in res["test"]["exit_rates"]]
    p95_test = min(t for t in times
                   if 100 * sum(c for u, c in zip(times, counts) if u <= t) >= 95 * n)
    assert exp["p95_ms_test_rates"] == pytest.approx(p95_test, rel=1e-12)
    b = lat["budget"]
    assert (b["budget_ms"], b["budget_p95_ms"]) == (mean_budget, p95_budget)
    assert b["expected_p95_ms"] == target["expected_p95_ms"]
    assert b["measured_p95_within_budget"] == (lat["p95_ms"] <= p95_budget)
    assert b["measured_within_budget"] == (lat["mean_ms"] <= mean_budget)
    md = (out / "results.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("budget_ms="))
    assert f"budget_p95_ms={p95_budget:g}" in line and f"p95 {lat['p95_ms']:.4f} ms" in line
    assert f"p95 {b['expected_p95_ms']:.4f} ms on val" in line
    assert f"and budget_p95_ms {p95_budget:g} (its expected p95)" in report(res)


BAD = [
    ("unknown backend", ["tolerance=1", "engine=gpu"],
     "unknown engine 'gpu'; accepted: eager, compiled, onnxruntime"),
    ("negative budget_ms", ["budget_ms=-1"], "budget_ms=-1 must be milliseconds > 0"),
    ("budget_ms of 0", ["budget_ms=0"], "budget_ms=0 must be milliseconds > 0"),
    ("budget_ms as a word", ["budget_ms=fast"], "budget_ms='fast' must be milliseconds > 0"),
    ("budget_ms with a tolerance", ["budget_ms=0.5", "tolerance=1"],
     "budget_ms=0.5 is a calibration target of its own: drop tolerance=1"),
    ("budget_ms with MACs as the cost", ["budget_ms=0.5", "cost=macs"],
     "budget_ms=0.5 is in milliseconds: it needs measured latencies as the cost"),
    ("unknown cost", ["tolerance=1", "cost=flops"], "unknown cost 'flops'; accepted: macs, latency"),
    ("latency samples 0", ["tolerance=1", "tail_latency=true", "latency_samples=0"],
     "latency_samples=0 must be an integer >= 1"),
    ("budget_ms below the cheapest", ["budget_ms=1e-6"],
     "budget_ms=1e-06 is below the cheapest possible on engine=eager: "),
    ("budget_ms below the cheapest, compiled", ["budget_ms=1e-6", "engine=compiled"],
     "is below the cheapest possible on engine=compiled: "),
    ("budget_p95_ms below the lowest", ["budget_p95_ms=1e-6"],
     "budget_p95_ms=1e-06 is below the lowest possible on engine=eager: an expected p95 of "),
    ("both budgets below the cheapest", ["budget_ms=1e-6", "budget_p95_ms=2e-6"],
     "budget_ms=1e-06 and budget_p95_ms=2e-06 cannot both hold on engine=eager: "),
]


@pytest.mark.parametrize("name,overrides,message", BAD, ids=[r[0] for r in BAD])
def test_bad_values_are_one_line(digits_run, tmp_path, capsys, monkeypatch, name, overrides,
                                 message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    before, run_before = snapshot(tmp_path), snapshot(digits_run)
    _expect_one_line_exit(evaluate, eval_config(digits_run, tmp_path / "eval", *overrides),
                          capsys, message)
    assert snapshot(tmp_path) == before  # nothing written, nothing left
    assert snapshot(digits_run) == run_before


def test_onnxruntime_missing_is_one_line(digits_run, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    before = snapshot(tmp_path)
    _expect_one_line_exit(evaluate, eval_config(digits_run, tmp_path / "eval", "tolerance=1",
                                                "engine=onnxruntime"), capsys,
                          "engine=onnxruntime needs the package(s) onnxruntime, not installed "
                          "here: pip install 'eenet[export]'")
    assert snapshot(tmp_path) == before


def test_an_engine_cache_that_cannot_be_written_is_one_line(digits_run, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "a_file").write_text("not a folder\n")
    before, run_before = snapshot(tmp_path), snapshot(digits_run)
    _expect_one_line_exit(evaluate, eval_config(digits_run, tmp_path / "eval", "tolerance=1",
                                                "engine=onnxruntime",
                                                f"engine_cache={tmp_path / 'a_file' / 'c'}"),
                          capsys, "engine=onnxruntime cannot keep its build in ")
    assert snapshot(tmp_path) == before
    assert snapshot(digits_run) == run_before
