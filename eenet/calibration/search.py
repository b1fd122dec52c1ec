"""Exit thresholds chosen on the validation split, for a cost budget or an accuracy tolerance.

One static pass caches every exit's outputs on the validation split
(:func:`cache_exit_outputs`). For a policy, every sample's scores s_i (see
``eenet.policies``) and every exit's correctness are then fixed, and any
threshold vector t = (t_0..t_{N-1}) is evaluated without running the network:
the sample leaves at the first i with s_i > t_i, so

    accuracy(t) = mean_b correct[b, exit_t(b)],   cost(t) = mean_b c_t[exit_t(b)],

where c_t is c with the heads of idle exits (t_i = inf: they release no sample)
left out when the cost table is given: the dynamic engine does not run those
heads, so an exit that does not pay for itself costs nothing once switched off,
and the search over thresholds is also a search over which exits to keep.

:meth:`Calibrator.evaluate` does this for T threshold vectors at once (a
(T, B, N) comparison). Targets:

- ``budget`` B: the highest accuracy with average cost fraction <= B;
- ``tolerance`` D (accuracy points): the lowest average cost with accuracy >=
  (accuracy of always taking the final exit) - D/100.

Per-exit thresholds are searched over a grid of candidate values per exit
(quantiles of that exit's scores on val, plus "never leave here" and "always
leave here"): every combination when there are few (two exits: about 4,000),
otherwise coordinate descent from several starting points (the best shared
threshold, the final-exit-only point, the cheapest point), keeping the best.
The shared-threshold sweep gives the accuracy-versus-cost curve and, with
every point the search evaluated, the Pareto front. Thresholds are never tuned
on the test split: the caller passes validation outputs, and ``eenet-eval``
only evaluates the chosen thresholds on test.

Searching many thresholds on one split is optimistic: the chosen point sits
right at the tolerance on val, partly because val's noise happens to favour
it, and on new samples its drop is larger. ``optimism_folds=K`` estimates that
optimism by K-fold cross-validation on val (calibrate on K-1 folds, measure the
drop on the held-out fold, compare with the drop the calibration saw; the
optimism of an apparent error, Efron, JASA 1983) and tightens the tolerance by
it (never loosens it) before the final search on the whole split.

Latency as the cost: a measured table (``eenet.inference.latency.latency_cost_table``: per
exit, the milliseconds per sample the engine pays to leave there, and what an idle head saves)
has the cost table's interface in units of the final exit's time, so every formula above holds
with c_i = ms_i / ms_N; ``budget_ms`` M is the budget M / ms_N, and the chosen point's
expected time per sample, E[ms] = ms_N x cost(t), is reported in the target.
``budget_p95_ms`` P bounds the tail as well (alone, or with ``budget_ms``: both hold): the
expected p95 of t, the smallest per-exit time ms_i(t) (idle heads left out) such that the exits
with ms_j(t) <= ms_i(t) take >= 95 % of the val samples
(:func:`eenet.inference.latency.exit_time_quantile`), must be <= P; the search keeps the most
accurate thresholds that meet every budget, and reports the expected p95 beside the mean.

MSDNet (Huang et al., ICLR 2018) chooses thresholds for a budget from an
assumed exit distribution; searching threshold vectors directly on validation
outputs reaches any distribution the data allows.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from eenet.cost import CostTable
from eenet.calibration.cache import CachedExits
from eenet.calibration.stats import pareto_indices
from eenet.errors import EENetError
from eenet.inference.latency import exit_time_quantile
from eenet.io import json_float
from eenet.policies import ExitPolicy, create_policy, first_exit


@dataclass
class OperatingPoint:
    """Thresholds (user units: a sample leaves exit i when its score > t_i, so ``inf``: never
    leave there, for every policy) and what they give on a split."""

    thresholds: list[float]
    accuracy: float
    avg_cost: float
    exit_rates: list[float]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [json_float(t) for t in self.thresholds]
        return d


@dataclass
class CalibrationResult:
    """The chosen thresholds for a target, with the curve and the Pareto front on val."""

    policy: str
    target: dict
    chosen: OperatingPoint
    reference: OperatingPoint  # always the final exit
    reachable: bool
    message: str
    curve: list[OperatingPoint] = field(default_factory=list)   # shared-threshold sweep
    pareto: list[OperatingPoint] = field(default_factory=list)  # non-dominated points

    def to_dict(self) -> dict:
        return {"policy": self.policy, "target": self.target, "reachable": self.reachable,
                "message": self.message, "chosen": self.chosen.to_dict(),
                "reference_final_exit": self.reference.to_dict(),
                "curve": [p.to_dict() for p in self.curve],
                "pareto": [p.to_dict() for p in self.pareto]}


class Calibrator:
    """Evaluate and search exit thresholds of one policy on cached outputs.

    Args:
        cached: outputs of every exit on the validation split.
        policy: policy name (``confidence``, ``max_prob``, ``entropy``, ``patience``).
        cost_fractions: the cost table (then idle exits' heads are not paid for, as in
            the dynamic engine), a measured latency table (the same interface, with
            ``final_ms``: then ``budget_ms`` is accepted), or plain fractions c_0..c_N
            (every head paid for).
        grid: number of candidate thresholds per exit (quantiles of its scores).
        exhaustive_limit: search every combination of candidates when there are at
            most this many; coordinate descent from several starts otherwise.
        temperatures: one T_i > 0 per exit (final included) for ``max_prob`` / ``entropy``:
            the scores are those of z_i / T_i, as the policy with these temperatures gives
            them to the engine (``eenet.policies``); ``None``: unscaled.
    """

    def __init__(self, cached: CachedExits, policy: str,
                 cost_fractions: CostTable | Sequence[float],
                 grid: int = 64, exhaustive_limit: int = 20_000,
                 temperatures: Sequence[float] | None = None):
        self.exhaustive_limit = exhaustive_limit
        self.grid = grid
        # thresholds come from the search; the temperatures, if any, are the policy's
        self.policy: ExitPolicy = create_policy(policy, temperatures=temperatures)
        self.scores = self.policy.scores(cached.outputs)  # (B, N), score units
        self.correct = cached.correct                     # (B, N+1)
        # a CostTable, or anything with its interface (a measured latency table)
        table = cost_fractions if (isinstance(cost_fractions, CostTable)
                                   or hasattr(cost_fractions, "head_fractions")) else None
        #: milliseconds per unit of cost when the costs are measured times, else None
        self.ms_per_unit = getattr(cost_fractions, "final_ms", None)
        fractions = table.fractions if table is not None else list(cost_fractions)
        self.costs = torch.tensor(fractions, dtype=torch.float64)
        self.n = self.scores.shape[1]
        if self.costs.numel() != self.n + 1:
            raise EENetError(f"{self.costs.numel()} cost fractions for {self.n + 1} exits")
        # what leaving exit i's head out saves (0 where it must run anyway)
        self.head_savings = torch.zeros(self.n, dtype=torch.float64)
        if table is not None and not self.policy.needs_every_exit:
            self.head_savings = (torch.tensor(table.head_fractions, dtype=torch.float64)
                                 * torch.tensor(table.skippable(), dtype=torch.float64))
        self.candidates = [self._candidates(self.scores[:, i], grid) for i in range(self.n)]

    # -- evaluation ---------------------------------------------------------------------------

    def _candidates(self, s: torch.Tensor, grid: int) -> torch.Tensor:
        """Candidate thresholds (score units) of one exit; ``inf`` (never leave) and the
        policy's "always leave" among them."""
        if self.policy.name == "patience":  # run lengths are integers 1..N; k = 1: always
            vals = torch.arange(1, self.n + 1, dtype=torch.float32) - 0.5
        else:
            q = torch.quantile(s.float(), torch.linspace(0, 1, grid))
            # just below each quantile, so that the quantile's own sample leaves too
            vals = torch.nextafter(q, torch.tensor(-math.inf))
        ends = self.policy.to_score_units(torch.tensor([math.inf, self.policy.always_leave]))
        return torch.unique(torch.cat([vals, ends]))

    def evaluate(self, thresholds: torch.Tensor, chunk: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Accuracy (T,), average cost (T,) and exit rates (T, N+1) of T threshold vectors.

        ``thresholds`` is (T, N) in score units.
        """
        return self._evaluate(thresholds, chunk)[:3]

    def expected_quantile_ms(self, thresholds: torch.Tensor, q: float = 0.95) -> torch.Tensor:
        """The expected q-quantile (q in [0, 1]) of the time per sample of T threshold vectors
        ((T, N), score units), with measured latencies as the cost: per vector, the smallest
        per-exit time ms_i (the final exit's ms x its cost fraction, idle heads left out) whose
        exits with ms_j <= ms_i take >= q of the samples (T,)."""
        if self.ms_per_unit is None:
            raise EENetError("an expected time quantile needs measured latencies as the cost "
                             "(a latency table, cost=latency)")
        return self._evaluate(thresholds, q=q)[3]

    def _evaluate(self, thresholds: torch.Tensor, chunk: int = 256, q: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`evaluate`, and with ``q`` the expected q-quantile of the time per sample
        (:meth:`expected_quantile_ms`; None without ``q``)."""
        accs, costs, rates, quantiles = [], [], [], []
        correct = self.correct.to(torch.float32)
        b = self.scores.shape[0]
        for start in range(0, thresholds.shape[0], chunk):
            t = thresholds[start:start + chunk].to(self.scores.dtype)
            exits = first_exit(self.scores, t.unsqueeze(1))                  # (t, B)
            onehot = torch.nn.functional.one_hot(exits, self.n + 1).to(torch.float32)
            counts = onehot.sum(1)                                            # (t, N+1)
            accs.append((onehot * correct).sum((1, 2)).double() / b)
            per_exit = self.costs.expand(t.shape[0], -1)
            if self.head_savings.any():  # idle exits (t_i = inf) do not run their heads
                saved = (torch.isposinf(t).double() * self.head_savings).cumsum(1)
                per_exit = self.costs - torch.cat([saved, saved[:, -1:]], 1)   # (t, N+1)
                costs.append((counts.double() * per_exit).sum(1) / b)
            else:
                costs.append(counts.double() @ self.costs / b)
            rates.append(counts.double() / b)
            if q is not None:  # per_exit of an idle exit differs from exit_ms, at rate 0
                quantiles.append(exit_time_quantile(per_exit * float(self.ms_per_unit),
                                                    rates[-1], q))
        return (torch.cat(accs), torch.cat(costs), torch.cat(rates),
                torch.cat(quantiles) if q is not None else None)

    def subset(self, index: torch.Tensor) -> "Calibrator":
        """The same calibrator over the samples ``index`` only (candidates from their scores)."""
        sub = copy.copy(self)
        sub.scores, sub.correct = self.scores[index], self.correct[index]
        sub.candidates = [sub._candidates(sub.scores[:, i], self.grid) for i in range(self.n)]
        return sub

    def optimism(self, tolerance: float, folds: int = 5, seed: int = 0, repeats: int = 1) -> dict:
        """K-fold estimate of how much a ``tolerance`` calibration understates its drop.

        The samples are shuffled with ``torch.randperm(B, generator=manual_seed(seed))``
        and cut into ``folds`` chunks (``Tensor.chunk``). For each chunk k the other
        chunks are calibrated for ``tolerance``; the calibration sees a drop
        d_in = (their final-exit accuracy - their chosen accuracy), and the held-out
        chunk shows d_out for the same thresholds. The optimism is mean_k (d_out - d_in),
        in accuracy points (positive: the calibration promises less drop than it gives).
        ``repeats`` > 1 averages over shuffles with seeds ``seed .. seed + repeats - 1``
        (repeated K-fold: one split's folds are a few hundred samples, so one shuffle's
        estimate varies by tenths of a point).
        """
        b = self.scores.shape[0]
        if not 2 <= folds <= b:
            raise EENetError(f"optimism needs 2 <= folds <= {b} samples, got {folds}")
        if repeats < 1:
            raise EENetError(f"optimism needs repeats >= 1, got {repeats}")
        gaps = []
        for r in range(repeats):
            gaps += self._fold_gaps(tolerance, folds, seed + r)
        return {"folds": folds, "seed": seed, "repeats": repeats,
                "optimism_points": sum(gaps) / len(gaps), "per_fold_points": gaps}

    def _fold_gaps(self, tolerance: float, folds: int, seed: int) -> list[float]:
        b = self.scores.shape[0]
        perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
        chunks = perm.chunk(folds)
        gaps = []
        for k, held in enumerate(chunks):
            rest = torch.cat([c for j, c in enumerate(chunks) if j != k])
            res = self.subset(rest).calibrate(tolerance=tolerance)
            got = self.correct_at(self.score_vector(res.chosen.thresholds))[held].double().mean()
            ref = self.correct[held, -1].double().mean()
            d_in = res.reference.accuracy - res.chosen.accuracy
            gaps.append(100 * (float(ref - got) - d_in))
        return gaps

    def score_vector(self, thresholds: Sequence[float | str]) -> torch.Tensor:
        """Thresholds in the user's units (floats, or ``"inf"`` as JSON writes it) as an (N,)
        vector in score units, for :meth:`evaluate` and :meth:`correct_at`."""
        return self.policy.to_score_units(
            torch.tensor([float(t) for t in thresholds], dtype=torch.float64))

    def correct_at(self, thresholds: torch.Tensor) -> torch.Tensor:
        """Per-sample correctness (B,) of one threshold vector (score units)."""
        exits = first_exit(self.scores, thresholds.view(-1).to(self.scores.dtype))
        return self.correct.gather(1, exits.view(-1, 1)).view(-1)

    def point(self, thresholds: torch.Tensor) -> OperatingPoint:
        """The operating point of one threshold vector (score units)."""
        acc, cost, rates = self.evaluate(thresholds.view(1, -1))
        user = self.policy.from_score_units(thresholds.view(-1).double()).tolist()
        return OperatingPoint(user, float(acc[0]), float(cost[0]), rates[0].tolist())

    # -- search ------------------------------------------------------------------------------

    def shared_sweep(self) -> torch.Tensor:
        """(T, N) threshold vectors that use one value for every exit."""
        vals = torch.unique(torch.cat(self.candidates))
        return vals.view(-1, 1).expand(-1, self.n).clone()

    @staticmethod
    def _excess(cost, value: float, p95=None, p95_limit: float | None = None):
        """How far a point is from a budget target: the largest of cost / budget and (with a
        p95 budget) expected p95 / its budget; <= 1 where it meets every budget."""
        out = cost / value if math.isfinite(value) else cost * 0.0
        if p95 is not None:
            out = (torch.maximum(out, p95 / p95_limit) if isinstance(out, torch.Tensor)
                   else max(out, p95 / p95_limit))
        return out

    @staticmethod
    def _best(acc: torch.Tensor, cost: torch.Tensor, kind: str, value: float,
              p95: torch.Tensor | None = None, p95_limit: float | None = None
              ) -> tuple[int, bool]:
        """Index of the best point for the target, and whether it meets it.

        Budget: the highest accuracy with cost <= value (and, with ``p95``, expected p95 <=
        ``p95_limit``), ties to the lowest cost. Tolerance: the lowest cost with accuracy >=
        value, ties to the highest accuracy. When no point meets the target: the one nearest
        the budgets (:meth:`_excess`; the cheapest for a cost budget alone), ties to the
        lowest cost (budget), or the most accurate (tolerance).
        """
        inf = torch.tensor(math.inf, dtype=torch.float64)
        acc, cost = acc.double(), cost.double()
        if kind == "budget":
            feasible = cost <= value + 1e-12
            if p95 is not None:
                feasible &= p95.double() <= p95_limit + 1e-12
            if not feasible.any():
                excess = Calibrator._excess(cost, value, p95, p95_limit)
                near = excess <= excess.min() + 1e-12
                return int(torch.argmin(torch.where(near, cost, inf))), False
            top = torch.where(feasible, acc, -inf).max()
            tied = feasible & (acc >= top - 1e-12)
            return int(torch.argmin(torch.where(tied, cost, inf))), True
        feasible = acc >= value - 1e-12
        if not feasible.any():
            return int(torch.argmax(acc)), False
        low = torch.where(feasible, cost, inf).min()
        tied = feasible & (cost <= low + 1e-12)
        return int(torch.argmax(torch.where(tied, acc, -inf))), True

    def _measure(self, thresholds: torch.Tensor, p95_limit: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Accuracy, average cost and (with a p95 budget) the expected p95 in ms."""
        acc, cost, _, p95 = self._evaluate(thresholds, q=None if p95_limit is None else 0.95)
        return acc, cost, p95

    def _search_key(self, thresholds: torch.Tensor, kind: str, value: float,
                    p95_limit: float | None) -> tuple:
        """:meth:`_key` of one threshold vector."""
        acc, cost, p95 = self._measure(thresholds.view(1, -1), p95_limit)
        return self._key(float(acc[0]), float(cost[0]), kind, value,
                         None if p95 is None else float(p95[0]), p95_limit)

    def _descend(self, start: torch.Tensor, kind: str, value: float, rounds: int = 8,
                 p95_limit: float | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Coordinate descent over per-exit thresholds; returns the best vector and all tried."""
        cur = start.clone()
        tried = [cur.view(1, -1)]
        best_key = self._search_key(cur, kind, value, p95_limit)
        for _ in range(rounds):
            improved = False
            for i in range(self.n):
                cand = cur.view(1, -1).repeat(len(self.candidates[i]), 1)
                cand[:, i] = self.candidates[i]
                tried.append(cand)
                acc, cost, p95 = self._measure(cand, p95_limit)
                j, _ = self._best(acc, cost, kind, value, p95, p95_limit)
                key = self._key(float(acc[j]), float(cost[j]), kind, value,
                                None if p95 is None else float(p95[j]), p95_limit)
                if key > best_key:
                    best_key, cur, improved = key, cand[j].clone(), True
            if not improved:
                break
        return cur, tried

    @staticmethod
    def _key(acc: float, cost: float, kind: str, value: float, p95: float | None = None,
             p95_limit: float | None = None) -> tuple:
        """The order of :meth:`_best` for one point (larger is better)."""
        if kind == "budget":
            ok = cost <= value + 1e-12 and (p95 is None or p95 <= p95_limit + 1e-12)
            excess = Calibrator._excess(cost, value, p95, p95_limit)
            return (1, acc, -cost) if ok else (0, -excess, -cost, acc)
        ok = acc >= value - 1e-12
        return (1, -cost, acc) if ok else (0, acc, -cost)

    def calibrate(self, budget: float | None = None, tolerance: float | None = None,
                  min_accuracy: float | None = None, optimism_folds: int = 0,
                  optimism_seed: int = 0, optimism_repeats: int = 1,
                  budget_ms: float | None = None,
                  budget_p95_ms: float | None = None) -> CalibrationResult:
        """Thresholds for a cost ``budget``, an accuracy ``tolerance`` (accuracy points below
        the final exit) or an absolute ``min_accuracy`` (a fraction, e.g. a reference model's
        validation accuracy minus a tolerance).

        ``optimism_folds=K`` (tolerance only): tighten the tolerance by the K-fold
        estimate of the calibration's optimism (:meth:`optimism`, averaged over
        ``optimism_repeats`` shuffles), never loosen it.

        ``budget_ms`` (with a latency table as the cost): the most accurate thresholds whose
        expected time per sample is within that many milliseconds. ``budget_p95_ms`` (the
        same cost): whose expected p95 (:meth:`expected_quantile_ms`) is within that many
        milliseconds, alone or with ``budget_ms`` (or ``budget``): every budget holds.
        """
        ms_target = p95_target = None
        for name, given in (("budget_ms", budget_ms), ("budget_p95_ms", budget_p95_ms)):
            if given is not None and self.ms_per_unit is None:
                raise EENetError(f"{name} needs measured latencies as the cost (a latency "
                                 f"table, cost=latency); with MACs give budget=B (a fraction)")
        if budget_p95_ms is not None:
            if tolerance is not None or min_accuracy is not None:
                raise EENetError("budget_p95_ms bounds the time per sample: give it alone or "
                                 "with budget_ms=M, not with a tolerance or min_accuracy")
            if not budget_p95_ms > 0:
                raise EENetError(f"budget_p95_ms must be > 0 milliseconds, got {budget_p95_ms}")
            p95_target = float(budget_p95_ms)
        if budget_ms is not None:
            if budget is not None:
                raise EENetError("give budget=B (a cost fraction) or budget_ms=M, not both")
            if not budget_ms > 0:
                raise EENetError(f"budget_ms must be > 0 milliseconds, got {budget_ms}")
            ms_target = float(budget_ms)
            budget = ms_target / float(self.ms_per_unit)
        elif p95_target is not None and budget is None:
            budget = math.inf  # the p95 alone bounds the time
        if sum(v is not None for v in (budget, tolerance, min_accuracy)) != 1:
            raise EENetError("give exactly one calibration target: budget=B (average cost "
                             "fraction) or tolerance=D (accuracy points below the final exit)")
        correction = None
        if optimism_folds:
            if tolerance is None:
                raise EENetError("optimism_folds corrects a tolerance target; give tolerance=D")
            correction = self.optimism(float(tolerance), int(optimism_folds), int(optimism_seed),
                                       int(optimism_repeats))
            correction["tolerance"] = float(tolerance)
            correction["effective_tolerance"] = max(
                0.0, float(tolerance) - max(0.0, correction["optimism_points"]))
            tolerance = correction["effective_tolerance"]
        never = torch.full((self.n,), math.inf)
        always_first = self.policy.to_score_units(torch.full((self.n,), self.policy.always_leave))
        reference = self.point(never)
        if budget is not None:
            if not budget > 0:
                raise EENetError(f"budget must be an average cost fraction > 0, got {budget}")
            kind, value = "budget", float(budget)
            target = {"kind": "budget", "value": value}
            if ms_target is not None:
                target = {"kind": "budget_ms", "value": ms_target, "budget_fraction": value}
            elif math.isinf(value):
                target = {"kind": "budget_p95_ms", "value": p95_target}
            if p95_target is not None:
                target["budget_p95_ms"] = p95_target
        elif min_accuracy is not None:
            if not 0 <= min_accuracy <= 1:
                raise EENetError(f"min_accuracy must be a fraction in [0, 1], got {min_accuracy}")
            kind, value = "tolerance", float(min_accuracy)
            target = {"kind": "min_accuracy", "value": value, "min_accuracy": value,
                      "final_exit_accuracy": reference.accuracy}
        else:
            if not tolerance >= 0:
                raise EENetError(f"tolerance must be >= 0 accuracy points, got {tolerance}")
            kind, value = "tolerance", reference.accuracy - float(tolerance) / 100
            target = {"kind": "tolerance", "value": float(tolerance),
                      "min_accuracy": value, "final_exit_accuracy": reference.accuracy}
            if correction is not None:  # value: the tolerance asked for; searched: the tightened one
                target.update(value=correction["tolerance"], optimism=correction)

        tail = p95_target  # the p95 budget in ms, or None
        shared = self.shared_sweep()
        acc, cost, p95 = self._measure(shared, tail)
        j, _ = self._best(acc, cost, kind, value, p95, tail)
        pool = [shared]
        best, best_key = None, None
        if math.prod(len(c) for c in self.candidates) <= self.exhaustive_limit:
            # few exits: try every combination of candidate thresholds
            every = torch.cartesian_prod(*self.candidates).view(-1, self.n)
            a, c, p = self._measure(every, tail)
            k, _ = self._best(a, c, kind, value, p, tail)
            pool.append(every)
            best = every[k]
            best_key = self._search_key(best, kind, value, tail)
            # a shared threshold is not always on the per-exit grid (each exit's candidates
            # are its own quantiles): keep the best shared vector when it beats the grid
            shared_key = self._search_key(shared[j], kind, value, tail)
            if shared_key > best_key:
                best, best_key = shared[j], shared_key
        else:
            for s in (shared[j], never, always_first):
                vec, tried = self._descend(s, kind, value, p95_limit=tail)
                pool.extend(tried)
                key = self._search_key(vec, kind, value, tail)
                if best_key is None or key > best_key:
                    best, best_key = vec, key
        chosen = self.point(best)
        expected_p95 = None
        if self.ms_per_unit is not None:  # E[ms per sample] = ms_N x cost(t)
            target["final_exit_ms"] = float(self.ms_per_unit)
            target["expected_ms"] = chosen.avg_cost * float(self.ms_per_unit)
            expected_p95 = float(self.expected_quantile_ms(best.view(1, -1))[0])
            target["expected_p95_ms"] = expected_p95
        reachable = best_key[0] == 1
        if reachable:
            message = (f"{kind} target met on val: accuracy {100 * chosen.accuracy:.2f}% at "
                       f"average cost fraction {chosen.avg_cost:.4f}")
            if tail is not None:
                message += (f", expected {target['expected_ms']:.4f} ms per sample, p95 "
                            f"{expected_p95:.4f} ms")
            if correction is not None:
                message += (f" (tolerance {correction['tolerance']:g} tightened to "
                            f"{correction['effective_tolerance']:.3f} by a "
                            f"{correction['folds']}-fold (x{correction['repeats']}) optimism of "
                            f"{correction['optimism_points']:+.3f} points)")
        elif kind == "budget" and tail is not None:
            mean = ([f"budget_ms {ms_target:g}"] if ms_target is not None
                    else [] if math.isinf(value) else [f"budget {value:g}"])
            asked = " and ".join([*mean, f"budget_p95_ms {tail:g}"])
            message = (f"{asked} unreachable: the nearest point expects "
                       f"{target['expected_ms']:.4f} ms per sample, p95 {expected_p95:.4f} ms "
                       f"(average cost fraction {chosen.avg_cost:.4f}); returning it")
        elif kind == "budget":
            message = (f"budget {value} is unreachable: the cheapest point costs "
                       f"{chosen.avg_cost:.4f} (every sample at the first exit); returning it")
        else:
            message = (f"tolerance unreachable: best accuracy {100 * chosen.accuracy:.2f}% < "
                       f"{100 * value:.2f}%; returning the most accurate point")
        everything = torch.cat(pool)
        a_all, c_all, _ = self.evaluate(everything)
        front = pareto_indices(a_all, c_all)
        return CalibrationResult(
            policy=self.policy.name, target=target, chosen=chosen, reference=reference,
            reachable=reachable, message=message,
            curve=[self.point(shared[k]) for k in pareto_indices(acc, cost, keep_all=True)],
            pareto=[self.point(everything[k]) for k in front])
