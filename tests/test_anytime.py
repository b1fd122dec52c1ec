"""The anytime view (``eenet.calibration.anytime``) and its AUC against hand-computed cases.

``anytime_view`` chooses thresholds on val for budgets of 25/50/75/100 % of the
backbone's MACs, reports the test accuracy and cost at them, and summarises the
val Pareto front, evaluated on test, by the area under the step function
"best test accuracy at test cost <= c" over c in [0, 1].
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from eenet.calibration import CachedExits, anytime_view, step_auc

# ---------------------------------------------------------------------------------- step_auc


@pytest.mark.parametrize("points,area", [
    ([], 0.0),                                        # nothing reachable: 0
    ([(0.2, 0.5), (0.6, 0.9)], 0.5 * 0.4 + 0.9 * 0.4),
    ([(0.6, 0.9), (0.2, 0.5)], 0.5 * 0.4 + 0.9 * 0.4),  # order does not matter
    ([(0.2, 0.5), (0.4, 0.3), (0.6, 0.9)], 0.5 * 0.4 + 0.9 * 0.4),  # a dominated point adds 0
    ([(0.2, 0.5), (1.2, 1.0)], 0.5 * 0.8),            # above the budget range: not counted
    ([(0.0, 0.8)], 0.8),                              # free: the whole range
    ([(1.0, 0.9)], 0.0),                              # only at full cost: a line, area 0
])
def test_step_auc_of_hand_computed_cases(points, area):
    assert step_auc(points) == pytest.approx(area, abs=1e-15)


def test_step_auc_equals_a_riemann_sum_of_the_step_function():
    """Midpoint sums over M cells: each jump of the step function falls in one cell and
    errs there by at most its height (<= 1) times the cell width, so with P points the
    sum is within P / M of the area."""
    rng = random.Random(0)
    cells = 20_000
    for _ in range(20):
        pts = [(rng.uniform(0, 1.2), rng.uniform(0, 1)) for _ in range(rng.randint(1, 8))]
        riemann = 0.0
        for m in range(cells):
            c = (m + 0.5) / cells
            riemann += max([a for cost, a in pts if cost <= c], default=0.0) / cells
        assert step_auc(pts) == pytest.approx(riemann, abs=len(pts) / cells)


# ---------------------------------------------------------------------------------- anytime_view


def cached(scores: list[float], early_right: list[int], final_right: list[int]) -> CachedExits:
    """One early exit with confidence h = ``scores``; 2 classes, target 0."""
    n = len(scores)

    def logits(right):
        lg = torch.zeros(n, 2)
        lg[:, 0] = torch.tensor([1.0 if r else -1.0 for r in right])
        return lg

    conf = [torch.logit(torch.tensor(scores, dtype=torch.float64)).float(),
            torch.full((n,), math.inf)]
    return CachedExits([logits(early_right), logits(final_right)], conf,
                       torch.zeros(n, dtype=torch.long))


def test_anytime_view_of_a_hand_computed_case():
    """Val: confidences 0.9, 0.8, 0.3, 0.2, the early exit right on all but the third, the
    final exit right on all; costs 0.25 (early) and 1.0 (final). Letting out the k most
    confident samples gives, on val (cost, accuracy):

        k = 0: (1, 1)   k = 1: (0.8125, 1)   k = 2: (0.625, 1)
        k = 3: (0.4375, 0.75)   k = 4: (0.25, 0.75)

    so budgets 0.25 and 0.5 choose k = 4 (0.75 at 0.25, the cheapest of the two tied
    points) and 0.75 and 1.0 choose k = 2. Test has the same confidences (so each choice
    lets out the same samples there), the early exit right on the first and last only,
    the final exit right on all: k = 4 gives (0.25, 0.5) on test, k = 2 (0.625, 0.75).
    The val Pareto front is {k = 4, k = 2}, so the test curve is those two points and

        AUC = 0.5 * (0.625 - 0.25) + 0.75 * (1 - 0.625) = 0.46875.
    """
    h = [0.9, 0.8, 0.3, 0.2]
    val = cached(h, [1, 1, 0, 1], [1, 1, 1, 1])
    test = cached(h, [1, 0, 0, 1], [1, 1, 1, 1])
    view = anytime_view(val, test, "confidence", [0.25, 1.0])
    rows = {r["budget"]: r for r in view["budgets"]}
    expected = {0.25: (0.25, 0.75, 0.25, 0.5), 0.5: (0.25, 0.75, 0.25, 0.5),
                0.75: (0.625, 1.0, 0.625, 0.75), 1.0: (0.625, 1.0, 0.625, 0.75)}
    assert sorted(rows) == sorted(expected)
    for b, (val_cost, val_acc, test_cost, test_acc) in expected.items():
        r = rows[b]
        assert r["reachable"]
        assert (r["val_cost"], r["val_accuracy"]) == pytest.approx((val_cost, val_acc))
        assert (r["test_cost"], r["test_accuracy"]) == pytest.approx((test_cost, test_acc))
    curve = sorted((p["avg_cost"], p["accuracy"]) for p in view["test_curve"])
    assert [v for point in curve for v in point] == pytest.approx([0.25, 0.5, 0.625, 0.75])
    assert view["auc"] == pytest.approx(0.46875)


def test_an_unreachable_budget_reports_no_test_figures():
    """Every sample at the early exit costs 0.25: a budget of 0.1 cannot be met."""
    h = [0.9, 0.8, 0.3, 0.2]
    val = cached(h, [1, 1, 0, 1], [1, 1, 1, 1])
    view = anytime_view(val, val, "confidence", [0.25, 1.0], budgets=(0.1, 0.5))
    low, mid = view["budgets"]
    assert not low["reachable"] and low["test_accuracy"] is None and low["test_cost"] is None
    assert mid["reachable"] and mid["test_accuracy"] == pytest.approx(0.75)


def random_cached(b: int, seed: int, n_early: int = 2, k: int = 4) -> CachedExits:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b,), generator=g)
    logits, conf = [], []
    for i in range(n_early + 1):
        lg = torch.randn(b, k, generator=g)
        lg[torch.arange(b), y] += (1 + i) * torch.rand(b, generator=g)
        logits.append(lg)
        conf.append(torch.randn(b, generator=g) + (lg.argmax(1) == y).float())
    conf[-1] = torch.full((b,), math.inf)
    return CachedExits(logits, conf, y)


def loop_evaluate(data: CachedExits, thresholds: list[float], costs: list[float]) -> tuple:
    """(accuracy, cost) of confidence thresholds, one sample at a time: a sample leaves at
    the first early exit whose sigmoid(confidence logit) exceeds its threshold."""
    n_early = len(thresholds)
    right, paid = 0, 0.0
    for b in range(len(data)):
        k = next((i for i in range(n_early)
                  if float(torch.sigmoid(data.conf_logits[i][b])) > float(thresholds[i])), n_early)
        right += int(data.logits[k][b].argmax()) == int(data.targets[b])
        paid += costs[k]
    return right / len(data), paid / len(data)


def test_anytime_rows_and_auc_on_random_outputs_against_a_plain_loop():
    """Each budget's test figures are its val-chosen thresholds evaluated on test one
    sample at a time; the AUC is the Riemann integral of the reported test curve (error
    at most (number of points) / (number of cells), as above); nothing on test is chosen:
    the rows' thresholds and val figures are those of the same view with test replaced."""
    val, test = random_cached(300, 1), random_cached(300, 2)
    costs = [0.2, 0.5, 1.05]
    view = anytime_view(val, test, "confidence", costs)
    for r in view["budgets"]:
        assert r["reachable"] and r["val_cost"] <= r["budget"] + 1e-12
        acc, cost = loop_evaluate(test, r["thresholds"], costs)
        assert r["test_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert r["test_cost"] == pytest.approx(cost, abs=1e-12)
    pts = [(p["avg_cost"], p["accuracy"]) for p in view["test_curve"]]
    cells = 20_000
    riemann = sum(max([a for c, a in pts if c <= (m + 0.5) / cells], default=0.0)
                  for m in range(cells)) / cells
    assert view["auc"] == pytest.approx(riemann, abs=len(pts) / cells)
    # thresholds never see test: another test split, the same choices
    other = anytime_view(val, random_cached(300, 3), "confidence", costs)
    for r, o in zip(view["budgets"], other["budgets"]):
        assert (r["thresholds"], r["val_accuracy"], r["val_cost"]) == (
            o["thresholds"], o["val_accuracy"], o["val_cost"])
