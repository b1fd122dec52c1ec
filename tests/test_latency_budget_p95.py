"""A budget on the expected p95 of the time per sample (issue 19): the expected quantile of a
latency table against brute force, the calibrator's choice under ``budget_p95_ms`` (alone and
with ``budget_ms``) against every candidate threshold vector, and bad values in one line."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from eenet.calibration import Calibrator
from eenet.calibration.cache import CachedExits
from eenet.config import compose_config
from eenet.errors import EENetError
from eenet.inference import LatencyCostTable
from eenet.inference.latency import exit_time_quantile
from eenet.jobs.evaluate import evaluate
from folder_state import snapshot  # tests/ is on sys.path
from test_bad_input import _expect_one_line_exit

#: the expected quantile and the calibrator compute per-exit times in units of the final
#: exit's time (ms_i / ms_N, less the idle heads' share) and multiply back: a few roundings
#: of numbers of order 1, far below this
REL = 1e-12


def quantile_of_counts(times: list[float], counts: list[int], q: Fraction) -> float:
    """The smallest time t among the exits with sum_{j: times_j <= t} counts_j >= q x n, in
    exact integer arithmetic; the largest time when there are no samples."""
    n = sum(counts)
    if n == 0:
        return max(times)
    for t in sorted(set(times)):
        if Fraction(sum(c for s, c in zip(times, counts) if s <= t)) >= q * n:
            return t
    raise AssertionError("unreachable: the whole mass is below the largest time")


def test_exit_time_quantile_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    rows, k = 300, 5
    # times on a coarse grid, so that several exits often share a time
    times = (torch.randint(1, 12, (rows, k), generator=gen).double() / 10)
    counts = torch.randint(0, 30, (rows, k), generator=gen)
    counts[torch.rand(rows, k, generator=gen) < 0.3] = 0  # exits that release no sample
    counts[:3] = 0  # and rows without samples
    n = counts.sum(1, keepdim=True).clamp(min=1)
    rates = counts.double() / n
    for q in ("0.5", "0.95", "0.99", "1"):
        got = exit_time_quantile(times, rates, float(q))
        want = [quantile_of_counts(times[r].tolist(), counts[r].tolist(), Fraction(q))
                for r in range(rows)]
        assert got.tolist() == want, q  # the result is one of the given times, exactly


def test_table_percentile_leaves_idle_heads_out():
    table = LatencyCostTable(ms=[0.3, 0.7, 1.1, 1.6], head_ms=[0.05, 0.08, 0.02],
                             skippable_heads=[True, False, True], batch_size=1,
                             backend="synthetic")
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        idle = (torch.rand(3, generator=gen) < 0.5).tolist()
        counts = torch.randint(0, 20, (4,), generator=gen)
        counts[[i for i in range(3) if idle[i]]] = 0  # an idle exit releases no sample
        if counts.sum() == 0:
            counts[-1] = 1
        rates = (counts.double() / counts.sum()).tolist()
        # exit e pays ms_e less the heads of the skippable idle exits before it
        times = [table.ms[e] - sum(table.head_ms[j] for j in range(e)
                                   if idle[j] and table.skippable_heads[j]) for e in range(4)]
        for q in (50, 95, 99):
            want = quantile_of_counts(times, counts.tolist(), Fraction(q, 100))
            assert table.expected_percentile_ms(rates, q, idle) == pytest.approx(want, rel=REL)


# ---- the calibrator against brute force ------------------------------------------------------

def synthetic():
    gen = torch.Generator().manual_seed(3)
    b, k = 60, 4
    logits = [torch.randn(b, k, generator=gen) * s for s in (1.0, 2.0, 3.0, 4.0)]
    targets = torch.randint(k, (b,), generator=gen)
    cached = CachedExits(logits, [torch.zeros(b)] * 3 + [torch.full((b,), math.inf)], targets)
    table = LatencyCostTable(ms=[0.3, 0.55, 0.9, 1.6], head_ms=[0.05, 0.08, 0.04],
                             skippable_heads=[True, True, False], batch_size=1,
                             backend="synthetic")
    return cached, table


def every_point(cal: Calibrator, table: LatencyCostTable) -> list[tuple]:
    """(right, mean ms, p95 ms, thresholds) of every vector the exhaustive search tries: every
    combination of the per-exit candidates and every shared threshold."""
    scores, correct = cal.scores.tolist(), cal.correct.tolist()
    n, b = cal.n, len(scores)
    vecs = set(itertools.product(*[c.tolist() for c in cal.candidates]))
    vecs |= {tuple(v) for v in cal.shared_sweep().tolist()}
    out = []
    for t in vecs:
        idle = [math.isinf(x) and x > 0 for x in t]
        times = [table.ms[e] - sum(table.head_ms[j] for j in range(min(e, n))
                                   if idle[j] and table.skippable_heads[j])
                 for e in range(n + 1)]
        exits = [next((i for i in range(n) if s[i] > t[i]), n) for s in scores]
        counts = [exits.count(e) for e in range(n + 1)]
        right = sum(int(correct[k][e]) for k, e in enumerate(exits))
        mean = sum(times[e] for e in exits) / b
        out.append((right, mean, quantile_of_counts(times, counts, Fraction(95, 100)), t))
    return out


PAIRS = [(None, 0.35), (None, 0.6), (None, 0.9), (None, 1.6),  # the p95 alone
         (0.5, 0.6), (0.7, 0.6), (0.45, 1.0), (1.2, 0.95)]    # both
#: feasibility in the brute force: far below the gaps between the synthetic times
SLACK = 1e-9


def brute_best(points, budget_ms, budget_p95_ms):
    """The most accurate point meeting every budget given, ties to the lower mean time."""
    fits = [p for p in points if (budget_p95_ms is None or p[2] <= budget_p95_ms + SLACK)
            and (budget_ms is None or p[1] <= budget_ms + SLACK)]
    return max(fits, key=lambda p: (p[0], -p[1])) if fits else None


def test_the_p95_budgets_above_bind():
    """Not vacuous: for some pairs above the p95 budget changes the answer (fewer right)."""
    cached, table = synthetic()
    points = every_point(Calibrator(cached, "max_prob", table, grid=4), table)
    binds = [brute_best(points, m, p)[0] < brute_best(points, m, None)[0] for m, p in PAIRS]
    assert any(binds[:4]) and any(binds[4:]), binds


@pytest.mark.parametrize("budget_ms,budget_p95_ms", PAIRS)
def test_budget_p95_against_brute_force(budget_ms, budget_p95_ms):
    cached, table = synthetic()
    cal = Calibrator(cached, "max_prob", table, grid=4)
    points = every_point(cal, table)
    slack = SLACK
    best = brute_best(points, budget_ms, budget_p95_ms)
    assert best is not None, "a budget pair that no point meets tests nothing here"
    res = cal.calibrate(budget_ms=budget_ms, budget_p95_ms=budget_p95_ms)
    b = cached.targets.numel()
    assert res.reachable
    assert res.target["kind"] == ("budget_p95_ms" if budget_ms is None else "budget_ms")
    assert res.target["budget_p95_ms"] == budget_p95_ms
    # the most accurate point meeting every budget, ties to the lower mean time
    assert res.chosen.accuracy == pytest.approx(best[0] / b, abs=0.5 / b)
    assert res.target["expected_ms"] == pytest.approx(best[1], rel=REL)
    assert res.target["expected_p95_ms"] <= budget_p95_ms + slack
    if budget_ms is not None:
        assert res.target["expected_ms"] <= budget_ms + slack
    # the table's own quantile, given which exits are idle, is the calibrator's
    idle = [math.isinf(t) and t > 0 for t in res.chosen.thresholds]
    assert table.expected_percentile_ms(res.chosen.exit_rates, 95, idle) == pytest.approx(
        res.target["expected_p95_ms"], rel=REL)


def test_unreachable_p95_returns_the_lowest_p95():
    cached, table = synthetic()
    cal = Calibrator(cached, "max_prob", table, grid=4)
    lowest = min(p[2] for p in every_point(cal, table))
    res = cal.calibrate(budget_p95_ms=lowest / 2)
    assert not res.reachable
    assert res.target["expected_p95_ms"] == pytest.approx(lowest, rel=REL)
    assert "budget_p95_ms" in res.message and "unreachable" in res.message
    both = cal.calibrate(budget_ms=lowest / 2, budget_p95_ms=lowest / 2)
    assert not both.reachable and "budget_ms" in both.message


def test_budget_p95_needs_latency_costs_and_no_tolerance():
    cached, table = synthetic()
    with pytest.raises(EENetError, match="budget_p95_ms needs measured latencies"):
        Calibrator(cached, "max_prob", [0.2, 0.4, 0.6, 1.0], grid=4).calibrate(budget_p95_ms=0.5)
    cal = Calibrator(cached, "max_prob", table, grid=4)
    with pytest.raises(EENetError, match="not with a tolerance"):
        cal.calibrate(tolerance=1, budget_p95_ms=0.5)
    for bad in (0, -1.0, math.nan):
        with pytest.raises(EENetError, match="budget_p95_ms must be > 0 milliseconds"):
            cal.calibrate(budget_p95_ms=bad)


# ---- eenet-eval: bad values in one line (checked before the run is read) ----------------------

BAD = [
    ("p95 of 0", ["budget_p95_ms=0"], "budget_p95_ms=0 must be milliseconds > 0"),
    ("negative p95", ["budget_p95_ms=-2"], "budget_p95_ms=-2 must be milliseconds > 0"),
    ("p95 as a word", ["budget_p95_ms=fast"], "budget_p95_ms='fast' must be milliseconds > 0"),
    ("p95 with MACs as the cost", ["budget_p95_ms=0.5", "cost=macs"],
     "budget_p95_ms=0.5 is in milliseconds: it needs measured latencies as the cost"),
    ("both with MACs as the cost", ["budget_ms=0.4", "budget_p95_ms=0.5", "cost=macs"],
     "budget_ms=0.4 and budget_p95_ms=0.5 are in milliseconds: they need measured latencies"),
    ("p95 with a tolerance", ["budget_p95_ms=0.5", "tolerance=1"],
     "budget_p95_ms=0.5 is a calibration target of its own: drop tolerance=1"),
    ("p95 with a MACs budget", ["budget_p95_ms=0.5", "budget=0.3"],
     "budget_p95_ms=0.5 is a calibration target of its own: drop budget=0.3"),
]


@pytest.mark.parametrize("name,overrides,message", BAD, ids=[r[0] for r in BAD])
def test_bad_values_are_one_line(tmp_path, capsys, monkeypatch, name, overrides, message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"  # not a run: every value above is refused before it is read
    run.mkdir()
    before = snapshot(tmp_path)
    cfg = compose_config([f"run={run}", "threads=1", *overrides], output_dir=tmp_path / "eval",
                         config_name="eval")
    _expect_one_line_exit(evaluate, cfg, capsys, message)
    assert snapshot(tmp_path) == before
