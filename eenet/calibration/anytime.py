"""The anytime / budget view of a finished run: one number to rank early-exit methods.

For budgets of 25, 50, 75 and 100% of the plain backbone's MACs, thresholds are
chosen on the validation split (the most accurate per-exit thresholds whose
average cost fraction on val stays within the budget, ``Calibrator``) and the
test accuracy at those thresholds is reported, with the test cost they really
cost. The area under the curve (AUC) summarises the whole trade-off: the
operating points of the validation Pareto front are evaluated on test, the
test accuracy reachable at cost c is the best test accuracy of a point whose
test cost is at most c (0 below the cheapest), and

    AUC = integral over c in [0, 1] of accuracy(c) dc,

so a method that reaches a given accuracy at a lower cost scores higher; a
network that can only run in full scores 0 (its cost is above 1 once its exit
heads are counted). Nothing is tuned on test.
"""

from __future__ import annotations

from typing import Sequence

from eenet.cost import CostTable
from eenet.calibration.cache import CachedExits
from eenet.calibration.search import Calibrator

BUDGETS = (0.25, 0.5, 0.75, 1.0)


def step_auc(points: Sequence[tuple[float, float]], upper: float = 1.0) -> float:
    """Area under the best-accuracy-within-cost step function on [0, upper].

    ``points`` are ``(cost, accuracy)`` pairs; accuracy(c) = max accuracy of the
    points with cost <= c, 0 when none.
    """
    pts = sorted((c, a) for c, a in points if c <= upper)
    area, best, prev = 0.0, 0.0, 0.0
    for c, a in pts:
        c = max(c, 0.0)
        area += best * (c - prev)
        prev = c
        best = max(best, a)
    return area + best * (upper - prev)


def anytime_view(val: CachedExits, test: CachedExits, policy: str,
                 cost_fractions: CostTable | Sequence[float],
                 budgets: Sequence[float] = BUDGETS) -> dict:
    """Test accuracy at val-chosen thresholds for each budget, and the test AUC."""
    cal_val = Calibrator(val, policy, cost_fractions)
    cal_test = Calibrator(test, policy, cost_fractions, grid=2)
    def on_test(thresholds):
        vec = cal_val.score_vector(thresholds).view(1, -1)
        acc, cost, _ = cal_test.evaluate(vec)
        return float(acc[0]), float(cost[0])

    rows, pareto = [], []
    for b in budgets:
        res = cal_val.calibrate(budget=b)
        pareto += res.pareto  # the val points every search found, evaluated on test below
        acc, cost = on_test(res.chosen.thresholds)
        rows.append({"budget": b, "reachable": res.reachable, "val_accuracy": res.chosen.accuracy,
                     "val_cost": res.chosen.avg_cost, "test_accuracy": acc if res.reachable else None,
                     "test_cost": cost if res.reachable else None,
                     "thresholds": res.chosen.to_dict()["thresholds"]})
    curve = sorted({on_test(p.thresholds) for p in pareto}, key=lambda ac: ac[1])
    return {"policy": policy, "budgets": rows,
            "test_curve": [{"avg_cost": c, "accuracy": a} for a, c in curve],
            "auc": step_auc([(c, a) for a, c in curve])}
