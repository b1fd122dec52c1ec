"""Threshold calibration against brute force and the policies' own decisions."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from eenet.cost import CostTable, ExitCost
from eenet.errors import EENetError
from eenet.calibration import CachedExits, Calibrator, paired_drop, pareto_indices
from eenet.policies import create_policy


#: the calibrator's own comparison slack (Calibrator._best and _key: cost <= budget + 1e-12,
#: accuracy >= target - 1e-12), which absorbs the float64 rounding of targets such as
#: final accuracy - tolerance / 100 (~1e-16): what it counts as meeting a target meets it
#: to within this, so the brute force below uses the same rule
SLACK = 1e-12


def synthetic(n_exits=3, b=400, k=5, seed=0):
    """Exits that get better with depth, with confidences loosely tied to correctness."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b,), generator=g)
    logits, conf = [], []
    for i in range(n_exits):
        strength = 1.0 + 1.5 * i
        lg = torch.randn(b, k, generator=g)
        lg[torch.arange(b), y] += strength * torch.rand(b, generator=g) * 2
        logits.append(lg)
        correct = (lg.argmax(1) == y).float()
        conf.append(2 * correct - 1 + torch.randn(b, generator=g))
    conf[-1] = torch.full((b,), math.inf)
    costs = [0.2 + 0.8 * i / (n_exits - 1) for i in range(n_exits)]
    costs[-1] += 0.03
    return CachedExits(logits, conf, y), costs


@pytest.mark.parametrize("policy", ["confidence", "max_prob", "entropy", "patience"])
def test_evaluate_equals_the_policy_decisions(policy):
    cached, costs = synthetic()
    cal = Calibrator(cached, policy, costs, grid=8)
    vecs = torch.cartesian_prod(*cal.candidates)[:50]
    acc, cost, rates = cal.evaluate(vecs)
    correct = cached.correct
    for t in range(len(vecs)):
        user = cal.policy.from_score_units(vecs[t].double()).tolist()
        exits = create_policy(policy, user).decide(cached.outputs)
        assert float(acc[t]) == pytest.approx(correct[torch.arange(len(exits)), exits].float().mean())
        assert float(cost[t]) == pytest.approx(torch.tensor(costs)[exits].mean().item())
        assert rates[t].tolist() == pytest.approx(
            (torch.bincount(exits, minlength=3).double() / len(exits)).tolist())


def brute_force(cal, kind, value):
    best = None
    # the pool the calibrator searches with few exits: every combination and the shared sweep
    for vec in [*itertools.product(*[c.tolist() for c in cal.candidates]),
                *map(tuple, cal.shared_sweep().tolist())]:
        a, c, _ = cal.evaluate(torch.tensor([vec]))
        a, c = float(a[0]), float(c[0])
        if kind == "budget" and c <= value + SLACK:
            key = (a, -c)
        elif kind == "tolerance" and a >= value - SLACK:
            key = (-c, a)
        else:
            continue
        best = max(best, key) if best else key
    return best


@pytest.mark.parametrize("policy", ["confidence", "max_prob"])
@pytest.mark.parametrize("budget", [0.35, 0.6, 0.9])
def test_budget_finds_the_best_accuracy_within_budget(policy, budget):
    cached, costs = synthetic(seed=1)
    cal = Calibrator(cached, policy, costs, grid=12)
    res = cal.calibrate(budget=budget)
    assert res.reachable and res.chosen.avg_cost <= budget + SLACK
    acc, neg_cost = brute_force(cal, "budget", budget)
    assert res.chosen.accuracy == pytest.approx(acc)
    assert res.chosen.avg_cost == pytest.approx(-neg_cost)


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 5.0])
def test_tolerance_finds_the_cheapest_point_within_tolerance(tolerance):
    cached, costs = synthetic(seed=2)
    cal = Calibrator(cached, "confidence", costs, grid=12)
    res = cal.calibrate(tolerance=tolerance)
    final_acc = cached.correct[:, -1].double().mean().item()
    assert res.reference.accuracy == pytest.approx(final_acc)
    assert res.chosen.accuracy >= final_acc - tolerance / 100 - SLACK
    neg_cost, acc = brute_force(cal, "tolerance", final_acc - tolerance / 100)
    assert res.chosen.avg_cost == pytest.approx(-neg_cost)
    assert res.chosen.accuracy == pytest.approx(acc)


def test_coordinate_descent_with_many_exits_is_valid_and_beats_one_shared_threshold():
    cached, costs = synthetic(n_exits=5, b=600, seed=3)
    cal = Calibrator(cached, "confidence", costs, grid=24, exhaustive_limit=0)
    res = cal.calibrate(tolerance=1.0)
    assert res.chosen.accuracy >= res.reference.accuracy - 0.01 - SLACK
    acc, cost, _ = cal.evaluate(cal.shared_sweep())
    shared_ok = cost[acc >= res.reference.accuracy - 0.01 - SLACK]
    assert res.chosen.avg_cost <= float(shared_ok.min()) + SLACK
    assert len(res.chosen.thresholds) == 4


def test_unreachable_budget_says_so_and_returns_the_cheapest_point():
    cached, costs = synthetic(seed=4)
    res = Calibrator(cached, "max_prob", costs, grid=8).calibrate(budget=0.1)
    assert not res.reachable and "unreachable" in res.message
    assert res.chosen.avg_cost == pytest.approx(costs[0])  # every sample at the first exit
    assert res.chosen.exit_rates[0] == pytest.approx(1.0)


def exact_front(cal, cached, costs):
    """Every (cost, accuracy) pair the search had, and the non-dominated ones, by cost.

    The pool is the shared sweep and, 3 exits on a grid of 12 (searched exhaustively),
    every combination of candidates; each pair is worked out in exact fractions from the
    policy's own decisions, not from the calibrator's evaluation."""
    b, correct = len(cached), cached.correct
    assert math.prod(len(c) for c in cal.candidates) <= cal.exhaustive_limit
    points = set()
    for vec in torch.cat([cal.shared_sweep(), torch.cartesian_prod(*cal.candidates)]):
        exits = create_policy(cal.policy.name, cal.policy.from_score_units(vec.double()).tolist()
                              ).decide(cached.outputs)
        counts = torch.bincount(exits, minlength=len(costs)).tolist()
        points.add((sum(c * n for c, n in zip(costs, counts)) / b,
                    Fraction(int(correct[torch.arange(b), exits].sum()), b)))
    front = sorted(p for p in points
                   if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points))
    return points, front


#: dyadic costs (multiples of 1/32): the calibrator's float64 sums of them are exact and its
#: one division by B is correctly rounded, as is every accuracy k / B, so its figures equal
#: the exact fractions rounded once and are compared with ==, no tolerance
DYADIC = [Fraction(7, 32), Fraction(19, 32), Fraction(33, 32)]

PARETO_TARGETS = [
    {"budget": 0.6}, {"tolerance": 1.0}, {"tolerance": 4.0},
    {"budget": 0.45},  # once failed: the exhaustive branch ignored the shared sweep (fixed)
]


def test_pareto_front_is_every_non_dominated_point():
    cached, _ = synthetic(seed=5)
    cal = Calibrator(cached, "confidence", [float(c) for c in DYADIC], grid=12)
    res = cal.calibrate(budget=0.6)  # the pool, so the front, is the same for every target
    points, front = exact_front(cal, cached, DYADIC)
    assert len(front) >= 5 and len(points) > 2 * len(front)  # the front is a real selection
    assert [(p.avg_cost, p.accuracy) for p in res.pareto] == [(float(c), float(a)) for c, a in front]
    acc = torch.tensor([0.5, 0.6, 0.55, 0.9])
    cost = torch.tensor([0.1, 0.3, 0.4, 0.8])
    assert pareto_indices(acc, cost) == [0, 1, 3]


@pytest.mark.parametrize("target", PARETO_TARGETS)
def test_chosen_point_is_the_best_point_of_the_front_for_its_target(target):
    """Not merely some point no front point beats: the front's own best for the target."""
    cached, _ = synthetic(seed=5)
    cal = Calibrator(cached, "confidence", [float(c) for c in DYADIC], grid=12)
    res = cal.calibrate(**target)
    _, front = exact_front(cal, cached, DYADIC)
    if "budget" in target:  # the most accurate point within the budget (the front rises with cost)
        want = [p for p in front if p[0] <= Fraction(target["budget"])][-1]
    else:  # the cheapest point within the tolerance of the final exit's accuracy
        final = Fraction(int(cached.correct[:, -1].sum()), len(cached))
        want = next(p for p in front if p[1] >= final - Fraction(target["tolerance"]) / 100)
    assert 0 < front.index(want) < len(front) - 1  # neither end: the target cuts the front
    assert res.reachable
    assert (res.chosen.avg_cost, res.chosen.accuracy) == (float(want[0]), float(want[1]))


def test_calibration_input_errors():
    cached, costs = synthetic()
    cal = Calibrator(cached, "confidence", costs, grid=8)
    with pytest.raises(EENetError, match="exactly one calibration target"):
        cal.calibrate()
    with pytest.raises(EENetError, match="exactly one calibration target"):
        cal.calibrate(budget=0.5, tolerance=1)
    with pytest.raises(EENetError, match="tolerance must be >= 0"):
        cal.calibrate(tolerance=-1)
    with pytest.raises(EENetError, match="2 cost fractions for 3 exits"):
        Calibrator(cached, "confidence", costs[:2])


def test_thresholds_round_trip_through_json_strings():
    cached, costs = synthetic()
    res = Calibrator(cached, "entropy", costs, grid=8).calibrate(tolerance=50)
    d = res.to_dict()
    policy = create_policy("entropy", d["chosen"]["thresholds"])
    exits = policy.decide(cached.outputs)
    rates = (torch.bincount(exits, minlength=3).double() / len(exits)).tolist()
    assert rates == pytest.approx(res.chosen.exit_rates)


def cost_table(head_macs, stage_macs, backbone=1000, always_run=()):
    """A CostTable for exits after cumulative stage MACs ``stage_macs`` with ``head_macs``."""
    rows, paid = [], 0
    for i, (h, s) in enumerate(zip(head_macs, stage_macs)):
        paid += h
        rows.append(ExitCost(f"exit{i}", i, h, s + paid, (s + paid) / backbone))
    return CostTable(backbone_macs=backbone, input_size=(1, 8, 8), exits=rows,
                     always_run=list(always_run))


def test_idle_exits_are_not_charged_and_a_useless_exit_gets_switched_off():
    cached, _ = synthetic()
    # exit 1 can never be right: a search that keeps its (costly) head pays for nothing
    cached.logits[1] = torch.zeros_like(cached.logits[1])
    cached.logits[1][:, 0] = 1.0
    cached.logits[1][cached.targets == 0, 1] = 2.0
    table = cost_table([50, 200, 0], [200, 600, 1000])  # exit 1's head: 0.2 of the backbone
    plain = Calibrator(cached, "max_prob", table.fractions, grid=16)
    skipping = Calibrator(cached, "max_prob", table, grid=16)
    vecs = torch.cartesian_prod(*skipping.candidates)
    _, c_plain, _ = plain.evaluate(vecs)
    _, c_skip, rates = skipping.evaluate(vecs)
    for t in range(0, len(vecs), 37):  # each vector's cost from the table's own formula
        idle = [math.isinf(v) and v > 0 for v in vecs[t].tolist()]
        fr = torch.tensor(table.fractions_skipping(idle), dtype=torch.float64)
        assert float(c_skip[t]) == pytest.approx(float(rates[t] @ fr))
        # float64 sums of three products of values <= 1.25 each way: a few roundings of 2**-53
        assert float(c_skip[t]) <= float(c_plain[t]) + 2 ** -50
    res = skipping.calibrate(tolerance=1)
    assert res.reachable and math.isinf(res.chosen.thresholds[1])
    assert res.chosen.avg_cost < plain.calibrate(tolerance=1).chosen.avg_cost
    # the final exit alone costs the plain backbone: no head runs
    assert res.reference.avg_cost == pytest.approx(1.0)
    # a head that must run (its features feed the final exit) is always charged
    kept = cost_table([50, 200, 0], [200, 600, 1000], always_run=[1])
    assert kept.skippable() == [True, False]
    with pytest.raises(ValueError, match="always runs"):
        kept.fractions_skipping([False, True])
    assert Calibrator(cached, "max_prob", kept, grid=16).calibrate(
        tolerance=1).reference.avg_cost == pytest.approx(1.2)


def test_paired_drop_counts_disagreements_and_its_standard_error():
    ref = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    pol = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    got = paired_drop(ref, pol)
    d = [0, 1, 1, 0, -1, 0, 0, 0, 0, 0]  # ref - pol per sample
    mean = sum(d) / 10
    var = sum((x - mean) ** 2 for x in d) / 9
    assert got["drop_points"] == pytest.approx(100 * mean)
    assert got["se_points"] == pytest.approx(100 * math.sqrt(var / 10))
    assert got["discordant"] == pytest.approx(0.3)
    same = paired_drop(ref, ref)
    assert same["drop_points"] == 0 and same["se_points"] == 0 and same["discordant"] == 0
    with pytest.raises(EENetError, match="at least 2 samples"):
        paired_drop(ref[:1], pol[:1])


@pytest.mark.parametrize("policy", ["confidence", "max_prob"])
def test_correct_at_matches_the_accuracy_of_evaluate(policy):
    cached, costs = synthetic(n_exits=4, seed=2)
    cal = Calibrator(cached, policy, costs, grid=6)
    vecs = torch.cartesian_prod(*cal.candidates)[::37]
    acc, _, _ = cal.evaluate(vecs)
    for t in range(len(vecs)):
        assert float(cal.correct_at(vecs[t]).double().mean()) == pytest.approx(float(acc[t]))
    never = torch.full((3,), math.inf)
    assert torch.equal(cal.correct_at(never), cached.correct[:, -1])


def _sliced(cached, index):
    return CachedExits([lg[index] for lg in cached.logits],
                       [z[index] for z in cached.conf_logits], cached.targets[index])


def test_optimism_equals_k_fold_calibrations_done_by_hand():
    cached, costs = synthetic(n_exits=3, b=300, seed=4)
    cal = Calibrator(cached, "max_prob", costs, grid=12)
    got = cal.optimism(tolerance=2.0, folds=3, seed=7)
    chunks = torch.randperm(300, generator=torch.Generator().manual_seed(7)).chunk(3)
    gaps = []
    for k in range(3):
        rest = torch.cat([c for j, c in enumerate(chunks) if j != k])
        res = Calibrator(_sliced(cached, rest), "max_prob", costs, grid=12).calibrate(tolerance=2.0)
        held = Calibrator(_sliced(cached, chunks[k]), "max_prob", costs, grid=12)
        vec = held.policy.to_score_units(torch.tensor(res.chosen.thresholds, dtype=torch.float64))
        acc, _, _ = held.evaluate(vec.view(1, -1))
        final = held.correct[:, -1].double().mean()
        gaps.append(100 * ((float(final) - float(acc[0]))
                           - (res.reference.accuracy - res.chosen.accuracy)))
    assert got["per_fold_points"] == pytest.approx(gaps)
    assert got["optimism_points"] == pytest.approx(sum(gaps) / 3)
    # repeats: the folds of seeds 7 and 8, averaged
    two = cal.optimism(tolerance=2.0, folds=3, seed=7, repeats=2)
    again = cal.optimism(tolerance=2.0, folds=3, seed=8)
    assert two["per_fold_points"] == pytest.approx(gaps + again["per_fold_points"])
    assert two["optimism_points"] == pytest.approx(sum(two["per_fold_points"]) / 6)


def test_optimism_correction_tightens_the_tolerance_and_never_loosens_it():
    cached, costs = synthetic(n_exits=4, b=500, seed=5)
    cal = Calibrator(cached, "max_prob", costs, grid=16)
    plain = cal.calibrate(tolerance=3.0)
    corrected = cal.calibrate(tolerance=3.0, optimism_folds=4)
    opt = corrected.target["optimism"]
    assert corrected.target["value"] == 3.0 and opt["folds"] == 4
    assert opt["effective_tolerance"] == pytest.approx(max(0.0, 3.0 - max(0.0, opt["optimism_points"])))
    assert opt["effective_tolerance"] <= 3.0
    # the search ran for the tightened tolerance: same as asking for it directly
    direct = cal.calibrate(tolerance=opt["effective_tolerance"])
    assert corrected.chosen.accuracy == direct.chosen.accuracy
    assert corrected.chosen.avg_cost == direct.chosen.avg_cost
    assert corrected.chosen.accuracy >= plain.chosen.accuracy  # k / B, both rounded once
    assert corrected.target["min_accuracy"] == pytest.approx(
        corrected.reference.accuracy - opt["effective_tolerance"] / 100)
    with pytest.raises(EENetError, match="corrects a tolerance target"):
        cal.calibrate(budget=0.5, optimism_folds=3)
    with pytest.raises(EENetError, match="2 <= folds"):
        cal.optimism(1.0, folds=1)
    with pytest.raises(EENetError, match="repeats >= 1"):
        cal.optimism(1.0, folds=2, repeats=0)
