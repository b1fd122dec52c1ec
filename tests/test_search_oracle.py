"""The threshold search against an exhaustive search on the same small grid.

The oracle here shares nothing with ``eenet.calibration.search`` but its input:
the policy's scores s (B, N) of every sample at every early exit
(``Calibrator.scores``, from ``eenet.policies``, tested against a loop in
test_policies.py) and the grid of candidate thresholds (``Calibrator.candidates``:
"the same grid"). From the search module's documented contract:

- a sample leaves at the first early exit i with s_i > t_i, else at the final exit;
- accuracy(t) = mean_b correct[b, exit_t(b)];
- cost(t) = mean_b MACs_t(exit_t(b)) / MACs(backbone), where, given the cost table,
  the heads of idle exits (t_i = +inf in score units) are not paid for unless the
  policy needs every exit (patience) or the table says the head always runs;
- budget B: the highest accuracy with cost <= B, ties to the lowest cost;
  tolerance D: the lowest cost with accuracy >= final-exit accuracy - D/100, ties to
  the highest accuracy; min_accuracy m: the same with accuracy >= m; when no point
  meets the target: the cheapest point (budget) or the most accurate (accuracy).

The oracle evaluates every combination of candidates with numpy in exact integers
(correct counts, and MACs summed over samples), so the comparisons hold no
rounding; it then reads which point the calibrator chose and checks that it is as
good as the exhaustive optimum. With few combinations the calibrator itself
searches every one (``exhaustive_limit``); beyond that it runs coordinate descent
from three starts, a heuristic whose docstring promises no optimum: how often and
by how much it misses is measured and asserted below.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from eenet.calibration import CachedExits, Calibrator, cache_exit_outputs
from eenet.cost import CostTable, ExitCost

POLICIES = ("confidence", "max_prob", "entropy", "patience")


# ---------------------------------------------------------------------------------- the oracle


class Oracle:
    """Every vector the calibrator may choose from, evaluated with numpy: each combination of
    its per-exit candidate thresholds, and its shared-threshold sweep (a shared value is not
    always on an exit's own grid of quantiles)."""

    def __init__(self, cal: Calibrator, table: CostTable, needs_every_exit: bool):
        self.scores = cal.scores.numpy().astype(np.float32)           # (B, N), score units
        self.correct = cal.correct.numpy().astype(np.int64)           # (B, N+1)
        self.b, self.n = self.scores.shape
        self.table = table
        self.skip_heads = not needs_every_exit
        combos = np.array(list(itertools.product(*[c.numpy() for c in cal.candidates])),
                          dtype=np.float32).reshape(-1, self.n)
        self.grid = np.concatenate([combos, cal.shared_sweep().numpy().astype(np.float32)])
        self.counts, self.macs = self.evaluate(self.grid)

    def evaluate(self, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(correct count, total MACs over the samples) of each threshold vector (T, N)."""
        vecs = np.asarray(vecs, dtype=np.float32).reshape(-1, self.n)
        leave = self.scores[None, :, :] > vecs[:, None, :]                    # (T, B, N)
        leave = np.concatenate([leave, np.ones(leave.shape[:2] + (1,), bool)], axis=2)
        exits = leave.argmax(axis=2)                                           # first True
        counts = np.take_along_axis(self.correct[None].repeat(len(vecs), 0),
                                    exits[..., None], 2)[..., 0].sum(1)
        # MACs of reaching exit k: the table's, less the heads of idle exits j <= k
        heads = np.array([e.head_macs for e in self.table.exits[:-1]], dtype=np.int64)
        full = np.array([e.macs for e in self.table.exits], dtype=np.int64)
        idle = np.isposinf(vecs) & self.skip_heads
        idle &= np.array([j not in self.table.always_run for j in range(self.n)])
        saved = np.cumsum(idle * heads[None, :], axis=1)                      # (T, N)
        per_exit = full[None, :] - np.concatenate([saved, saved[:, -1:]], axis=1)
        macs = np.take_along_axis(per_exit, exits, 1).sum(1)
        return counts, macs

    def cost(self, macs: int) -> Fraction:
        return Fraction(int(macs), self.table.backbone_macs * self.b)

    def key(self, count: int, macs: int, kind: str, value: Fraction) -> tuple:
        """Larger is better; the first element says whether the target is met."""
        acc, cost = Fraction(int(count), self.b), self.cost(macs)
        if kind == "budget":
            return (1, acc, -cost) if cost <= value else (0, -cost, acc)
        return (1, -cost, acc) if acc >= value else (0, acc, -cost)

    def best(self, kind: str, value: Fraction) -> tuple:
        return max(self.key(c, m, kind, value) for c, m in zip(self.counts, self.macs))

    def final_accuracy(self) -> Fraction:
        return Fraction(int(self.correct[:, -1].sum()), self.b)


def check_against_oracle(cal: Calibrator, oracle: Oracle, kind: str, target: float) -> tuple:
    """Calibrate for one target; return (oracle key of the chosen point, oracle optimum)."""
    if kind == "budget":
        res = cal.calibrate(budget=target)
        value = Fraction(target)
    elif kind == "tolerance":
        res = cal.calibrate(tolerance=target)
        value = oracle.final_accuracy() - Fraction(target) / 100
    else:
        res = cal.calibrate(min_accuracy=target)
        value = Fraction(target)
    t = cal.policy.to_score_units(torch.tensor(res.chosen.thresholds, dtype=torch.float64))
    count, macs = oracle.evaluate(t.numpy()[None])
    # what the calibrator reports for its point is what the oracle measures there:
    # accuracy exactly (count / B in float32 sums of integers < 2**24), the cost up to
    # float64 rounding of B terms (relative error <= B * 2**-53 < 1e-12 for B < 4000)
    assert res.chosen.accuracy == int(count[0]) / oracle.b
    assert res.chosen.avg_cost == pytest.approx(float(oracle.cost(macs[0])), rel=1e-12)
    chosen = oracle.key(count[0], macs[0], kind, value)
    best = oracle.best(kind, value)
    assert res.reachable == bool(chosen[0]), res.message
    if not best[0] and not chosen[0]:  # unreachable: only "the cheapest" / "the most accurate" is documented
        chosen, best = chosen[:2], best[:2]
    return chosen, best, t.numpy().astype(np.float32)


def boundary_gap(oracle: Oracle, kind: str, value: Fraction) -> float:
    """How far the target is from the nearest grid point's cost (budget) or accuracy.

    The calibrator compares in float64 with a slack of 1e-12; the oracle in exact
    fractions. They agree whenever no grid point lies within 1e-12 of the target.
    """
    if kind == "budget":
        vals = [oracle.cost(m) for m in set(oracle.macs.tolist())]
    else:
        vals = [Fraction(int(c), oracle.b) for c in set(oracle.counts.tolist())]
    return min(abs(float(v - value)) for v in vals if v != value) if len(vals) > 1 else math.inf


# ---------------------------------------------------------------------------------- the data


def subset_exits(cached: CachedExits, table: CostTable, keep: list[int]
                 ) -> tuple[CachedExits, CostTable]:
    """The early exits ``keep`` (and the final exit) of a network, as if the others were not
    there: their heads are taken out of every later exit's MACs."""
    keep = [*keep, len(table.exits) - 1]
    heads = [e.head_macs for e in table.exits]
    stage = [e.macs - sum(heads[: i + 1]) for i, e in enumerate(table.exits)]  # stages only
    sub = table_from([stage[i] for i in keep], [heads[i] for i in keep], table.backbone_macs)
    return CachedExits([cached.logits[i] for i in keep], [cached.conf_logits[i] for i in keep],
                       cached.targets), sub


def synthetic(n_early: int, b: int = 240, k: int = 5, seed: int = 0) -> tuple[CachedExits, CostTable]:
    """N early exits that improve with depth, confidences loosely tied to correctness,
    and a cost table in integer MACs (backbone 1000, heads 10-40 MACs)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b,), generator=g)
    logits, conf = [], []
    for i in range(n_early + 1):
        lg = torch.randn(b, k, generator=g)
        lg[torch.arange(b), y] += (0.6 + 1.2 * i) * 2 * torch.rand(b, generator=g)
        logits.append(lg)
        right = (lg.argmax(1) == y).float()
        conf.append(1.5 * (2 * right - 1) + torch.randn(b, generator=g))
    conf[-1] = torch.full((b,), math.inf)
    stage = [int(1000 * (i + 1) / (n_early + 1)) - 5 for i in range(n_early)] + [995]
    heads = [int(h) for h in torch.randint(10, 40, (n_early,), generator=g)] + [5]
    return CachedExits(logits, conf, y), table_from(stage, heads, 1000)


def table_from(stage_macs: list[int], head_macs: list[int], backbone: int) -> CostTable:
    """A cost table from the cumulative stage MACs at each exit and each exit's head MACs."""
    rows, paid = [], 0
    for i, (s, h) in enumerate(zip(stage_macs, head_macs)):
        paid += h
        rows.append(ExitCost(f"exit{i}", i, h, s + paid, (s + paid) / backbone))
    return CostTable(backbone_macs=backbone, input_size=(1, 8, 8), exits=rows)


def targets_for(oracle: Oracle) -> list[tuple[str, float]]:
    """Two budgets, two tolerances and one min_accuracy inside this grid's range, away
    from every grid point by more than the calibrator's 1e-12 slack (checked)."""
    cheapest = float(oracle.cost(oracle.macs.min()))
    final = float(oracle.final_accuracy())
    best_acc = float(Fraction(int(oracle.counts.max()), oracle.b))
    out = [("budget", round(cheapest + 0.25 * (1 - cheapest), 6) + 1e-7),
           ("budget", round(cheapest + 0.6 * (1 - cheapest), 6) + 1e-7),
           ("tolerance", 0.5 + 1e-7), ("tolerance", 4.0 + 1e-7),
           ("min_accuracy", round(0.5 * (final + best_acc), 6) + 1e-7),
           ("budget", round(0.5 * cheapest, 6) + 1e-7)]  # unreachable: the cheapest point
    if best_acc < 0.99:  # unreachable: the most accurate point
        out.append(("min_accuracy", round(best_acc + 0.005, 6) + 1e-7))
    for kind, v in out:
        value = (Fraction(v) if kind != "tolerance"
                 else oracle.final_accuracy() - Fraction(v) / 100)
        assert boundary_gap(oracle, kind if kind == "budget" else "accuracy", value) > 1e-9
    return out


# ---------------------------------------------------------------------------------- exhaustive


@pytest.mark.parametrize("n_early", [2, 3, 4])
@pytest.mark.parametrize("policy", POLICIES)
def test_calibrator_finds_the_exhaustive_optimum_on_synthetic_outputs(policy, n_early):
    """grid=4: 4 quantiles and +-inf, at most 6 candidates per exit (6**4 = 1296 vectors),
    under the default exhaustive_limit, so the calibrator searches every combination."""
    cached, table = synthetic(n_early, seed=10 * n_early + POLICIES.index(policy))
    cal = Calibrator(cached, policy, table, grid=4)
    assert math.prod(len(c) for c in cal.candidates) <= cal.exhaustive_limit
    oracle = Oracle(cal, table, needs_every_exit=policy == "patience")
    for kind, target in targets_for(oracle):
        chosen, best, _ = check_against_oracle(cal, oracle, kind, target)
        assert chosen == best, (kind, target)


# ---------------------------------------------------------------------------------- coordinate descent


def line_improvements(cal: Calibrator, oracle: Oracle, chosen_t: np.ndarray, kind: str,
                      value: Fraction) -> list[tuple[int, float]]:
    """Single-coordinate moves on the grid (exit i to any of its candidates) that the
    oracle rates strictly better than ``chosen_t``: none at a coordinate-wise optimum."""
    count, macs = oracle.evaluate(chosen_t[None])
    here = oracle.key(count[0], macs[0], kind, value)
    # an unreachable target promises only the cheapest / the most accurate point
    size = len(here) if here[0] else 2
    out = []
    for i, cands in enumerate(cal.candidates):
        vecs = np.repeat(chosen_t[None], len(cands), 0)
        vecs[:, i] = cands.numpy()
        counts, macs = oracle.evaluate(vecs)
        out += [(i, float(c)) for c, n, m in zip(cands, counts, macs)
                if oracle.key(n, m, kind, value)[:size] > here[:size]]
    return out


def descent_cases(cached: CachedExits, table: CostTable, policy: str, grid: int) -> list[dict]:
    """Coordinate descent (forced: exhaustive_limit=0) against the oracle, for every target."""
    cal = Calibrator(cached, policy, table, grid=grid, exhaustive_limit=0)
    oracle = Oracle(cal, table, needs_every_exit=policy == "patience")
    out = []
    for kind, target in targets_for(oracle):
        chosen, best, t = check_against_oracle(cal, oracle, kind, target)
        value = (oracle.final_accuracy() - Fraction(target) / 100 if kind == "tolerance"
                 else Fraction(target))
        out.append({"kind": kind, "target": target, "chosen": chosen, "best": best,
                    "moves": line_improvements(cal, oracle, t, kind, value)})
    return out


def shortfall(m: dict) -> float:
    """How much worse than the grid's optimum the chosen point is: accuracy points (budget)
    or cost fraction (accuracy targets); inf when it misses a target the grid meets;
    negative when it beats the grid (descent also starts from off-grid shared values)."""
    if m["chosen"][0] != m["best"][0]:
        return math.inf if m["chosen"][0] < m["best"][0] else -math.inf
    return float(m["best"][1] - m["chosen"][1]) * (100 if m["kind"] == "budget" else 1)


@pytest.mark.parametrize("n_early", [2, 3, 4])
@pytest.mark.parametrize("policy", POLICIES)
def test_coordinate_descent_against_the_exhaustive_optimum(policy, n_early):
    """The heuristic path, forced, on the same grids. It promises no optimum, but what it
    does promise by construction is checked against the oracle: it meets every target the
    grid can meet, and it stops at a coordinate-wise optimum (no change of one exit's
    threshold to another of its candidates is better). How far that lands from the grid's
    optimum was measured, not asserted (the code does not promise it): over 2,501 cases
    (synthetic seeds 0-29, the four policies, 2-4 early exits, grid 4, the targets of
    ``targets_for``) it missed the optimum 54 times (2.2 %; never with 2 early exits, 20 with
    3, 34 with 4), by at most 9.2 accuracy points under a budget and 0.078 of the backbone's
    cost under a tolerance; it beat the grid's optimum 853 times (it also starts from shared
    thresholds that are not on an exit's own grid); it was never infeasible where the grid
    was, nor stopped short of a coordinate-wise optimum."""
    cached, table = synthetic(n_early, seed=10 * n_early + POLICIES.index(policy))
    for m in descent_cases(cached, table, policy, grid=4):
        assert m["chosen"][0] >= m["best"][0], m  # feasible whenever the grid is
        assert m["moves"] == [], m


# ---------------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def digits_val(tmp_path_factory):
    """A resnet20 trained one epoch on digits with exits after stages 1, 3, 5 and 7: every
    exit's outputs on the validation split (216 samples) and the cost table."""
    from eenet.config import compose_config
    from eenet.data.batching import make_loader
    from eenet.jobs.train import train

    out = tmp_path_factory.mktemp("digits_oracle")
    cfg = compose_config(["trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                          "logger=none", "anytime=false", "placement.method=explicit",
                          "placement.stages=[1,3,5,7]", "checkpoint.enabled=false"], output_dir=out)
    _, objects = train(cfg)
    net, dm = objects["net"], objects["datamodule"]
    val = cache_exit_outputs(net, make_loader(dm.val_dataset, 256, shuffle=False))
    return val, objects["cost"]


@pytest.mark.parametrize("keep", [[0, 2], [0, 1, 3], [0, 1, 2, 3]], ids=["2", "3", "4"])
@pytest.mark.parametrize("policy", POLICIES)
def test_calibrator_finds_the_exhaustive_optimum_on_a_digits_model(digits_val, policy, keep):
    cached, table = subset_exits(*digits_val, keep)
    cal = Calibrator(cached, policy, table, grid=4)
    oracle = Oracle(cal, table, needs_every_exit=policy == "patience")
    for kind, target in targets_for(oracle):
        chosen, best, _ = check_against_oracle(cal, oracle, kind, target)
        assert chosen == best, (kind, target)
    for m in descent_cases(cached, table, policy, grid=4):
        assert m["chosen"][0] >= m["best"][0], m
        assert m["moves"] == [], m


# ---------------------------------------------------------------------------------- a shared threshold


# Once a library bug (fixed in search.py calibrate): with few exits the calibrator searched every
# combination of per-exit candidates and ignored the shared-threshold vectors it had also
# evaluated; here (2 early exits, grid 64, tolerance 4) one of those costs 0.5842 against 0.5851.
def test_every_combination_is_never_worse_than_one_shared_threshold():
    cached, table = synthetic(2, seed=2002)
    cal = Calibrator(cached, "confidence", table)  # grid 64: 66**2 combinations, all searched
    assert math.prod(len(c) for c in cal.candidates) <= cal.exhaustive_limit
    oracle = Oracle(cal, table, needs_every_exit=False)
    target = 4.0 + 1e-7
    value = oracle.final_accuracy() - Fraction(target) / 100
    chosen, best, _ = check_against_oracle(cal, oracle, "tolerance", target)
    assert chosen >= best  # at least the optimum over the combinations
    counts, macs = oracle.evaluate(cal.shared_sweep().numpy())
    shared = max(oracle.key(c, m, "tolerance", value) for c, m in zip(counts, macs))
    assert chosen >= shared, (float(-chosen[1]), float(-shared[1]))
