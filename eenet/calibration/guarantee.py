"""Exit thresholds with a finite-sample guarantee on their risk: Learn then Test, RCPS, CRC.

The risk R(t) of a threshold vector t is the mean of a bounded per-sample loss
(``drop``, ``disagree`` or ``error``, :mod:`eenet.calibration.risk`) on new data
from the calibration data's distribution. Searching thresholds on the
calibration split (:class:`~eenet.calibration.search.Calibrator`) is
optimistic; the methods here return thresholds whose risk is certified at a
level ``alpha``, from ``n`` i.i.d. calibration samples:

- ``ltt``: Learn then Test (Angelopoulos, Bates, Candes, Jordan & Lei, "Learn
  then Test: Calibrating Predictive Algorithms to Achieve Risk Control", 2021)
  with the order of Pareto Testing (Laufer-Goldshtein, Fisch, Barzilay &
  Jaakkola, "Efficiently Controlling Multiple Risks with Pareto Testing", ICLR
  2023). The calibration split is cut at random into an ordering part and a
  testing part. On the ordering part a greedy walk (:func:`greedy_path`) goes
  from the final exit alone along the (risk, cost) Pareto front, lowering one
  exit's threshold per step where it saves the most cost per unit of risk; the
  sequence of its vectors is the path (the order comes from the first part, the
  p-values from the second, as in Pareto Testing). On the testing part each
  vector's null hypothesis H_t: R(t) > alpha gets a Hoeffding-Bentkus p-value,
  and fixed-sequence testing rejects in that order while p <= delta. The
  rejected prefix is the certified set; the cheapest of it is returned.
  Guarantee: P(R(t) <= alpha for every certified t) >= 1 - delta. No
  monotonicity is needed, and the thresholds are vectors.
- ``ucb``: an upper confidence bound (Bates, Angelopoulos, Lei, Malik & Jordan,
  "Distribution-Free, Risk-Controlling Prediction Sets", JACM 2021) along a
  one-dimensional path: one quantile level q of each exit's scores on the
  ordering part, from q = 1 (with the final exit alone first) down to q = 0.
  lambda-hat is the cheapest point such that the Hoeffding-Bentkus bound of
  every point from it to the safe end is at most alpha. Walking from the safe
  end and stopping at the first bound above alpha is fixed-sequence testing of
  the same p-values (p <= delta  <=>  bound <= alpha), so the guarantee
  P(R(t) <= alpha) >= 1 - delta holds without assuming the risk monotone.
- ``crc``: conformal risk control (Angelopoulos, Bates, Fisch, Lei & Schuster,
  "Conformal Risk Control", ICLR 2024) on the same path, with lambda increasing
  toward the safe end:
      lambda-hat = inf{lambda : n/(n+1) R_n(lambda) + B/(n+1) <= alpha},  B = 1,
  on the testing part's n samples. Guarantee: E[loss of a new sample at
  lambda-hat] <= alpha (in expectation over the calibration sample too). The
  theorem needs each sample's loss non-increasing in lambda: the path only
  moves samples to later exits (every exit's threshold rises with q), and CRC
  is run on the monotone upper bound max_{k >= j} L[b, k] of the loss
  (:func:`~eenet.calibration.risk.monotone_losses`), which does not increase
  as a sample leaves later. Every point with lambda >= lambda-hat has a loss at
  most lambda-hat's on every sample, so the cheapest of them keeps the
  guarantee. For ``drop`` and ``disagree`` the loss at the safe end (the final
  exit alone) is 0, as the theorem assumes; for ``error`` it is the final
  exit's error, and the bound holds when that is below alpha on the n + 1
  samples.

Hoeffding-Bentkus p-value of H: R > alpha, from the mean R_n of n losses in
[0, 1] (Bates et al. 2021, Prop. 3.2 and Sec. 3.1.3; Learn then Test, eq. 8):

    p_HB = min( exp(-n h1(min(R_n, alpha), alpha)),  e * P[Binomial(n, alpha) <= ceil(n R_n)] ),
    h1(a, b) = a log(a/b) + (1 - a) log((1 - a)/(1 - b)).

Zero observed risk gives p_HB = (1 - alpha)^n, so no vector can be certified
with fewer than log(delta) / log(1 - alpha) testing samples; such a split is
refused (:func:`check_calibration_size`). The paths come from the ordering part
and the p-values (or CRC's statistic) from the testing part, so the tested
sequence is fixed before the testing data is looked at. Among certified vectors
the cheapest is chosen by the average cost on the whole calibration split (cost
needs no labels, and choosing inside the certified set keeps every guarantee).

The uncorrected search of today (``Calibrator.calibrate``, the same risk at
most alpha on the calibration split) and its K-fold optimism correction are
reported beside the certified point, with what the guarantee costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.special import xlogy
from scipy.stats import binom

from eenet.calibration.cache import CachedExits
from eenet.calibration.risk import check_risk, exit_losses, has_labels, monotone_losses, risk_view
from eenet.calibration.search import Calibrator, OperatingPoint
from eenet.cost import CostTable
from eenet.errors import EENetError, unknown_name
from eenet.io import json_float

#: method -> the guarantee it gives, as written in results.json
METHODS = {
    "ltt": "P(R(t) <= alpha for every certified t) >= 1 - delta over the calibration sample "
           "(Learn then Test: fixed-sequence testing of Hoeffding-Bentkus p-values along a Pareto path)",
    "ucb": "P(R(t) <= alpha) >= 1 - delta over the calibration sample (RCPS: Hoeffding-Bentkus "
           "upper confidence bound along a shared quantile path)",
    "crc": "E[loss of a new sample at t] <= alpha, in expectation over the calibration sample "
           "(conformal risk control along a shared quantile path)",
}


# -- statistics -------------------------------------------------------------------------------

def hb_pvalue(risk, n: int, alpha) -> np.ndarray:
    """Hoeffding-Bentkus p-value of H: R > alpha for empirical risks ``risk`` of n samples
    (``risk`` and ``alpha`` broadcast against each other).

    p = min(exp(-n h1(min(R, alpha), alpha)), e * P[Binomial(n, alpha) <= ceil(n R)]),
    h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))   (Bates et al. 2021; Learn then Test).
    """
    r = np.asarray(risk, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    a = np.minimum(r, alpha)
    h1 = xlogy(a, a / alpha) + xlogy(1 - a, (1 - a) / (1 - alpha))  # 0 log 0 = 0
    hoeffding = np.exp(-n * h1)
    k = np.ceil(np.round(n * r, 6))  # n R is a count; rounding drops float noise before ceil
    bentkus = math.e * binom.cdf(k, n, alpha)
    return np.minimum(hoeffding, bentkus)


def hb_upper_bound(risk, n: int, delta: float, iters: int = 60) -> np.ndarray:
    """The Hoeffding-Bentkus upper confidence bound at level 1 - delta: the smallest alpha with
    p_HB(risk, n, alpha) <= delta (p_HB falls as alpha rises above the risk), by bisection to
    2^-iters; 1 when no alpha below 1 qualifies."""
    r = np.atleast_1d(np.asarray(risk, dtype=np.float64))
    top = np.nextafter(1.0, 0.0)  # alpha stays inside (0, 1)
    lo, hi = np.minimum(r, top), np.full_like(r, top)
    never = hb_pvalue(r, n, top) > delta
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = hb_pvalue(r, n, mid) <= delta
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return np.where(never, 1.0, hi)


def hb_min_samples(alpha: float, delta: float) -> int:
    """The smallest n for which zero observed risk gives p_HB <= delta: (1 - alpha)^n <= delta."""
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while n > 1 and (1 - alpha) ** (n - 1) <= delta:  # guard the float rounding of the ceil
        n -= 1
    while (1 - alpha) ** n > delta:
        n += 1
    return n


def fixed_sequence(pvalues, delta: float) -> int:
    """Fixed-sequence testing: reject H_0, H_1, ... in order while p_k <= delta; the number
    rejected. Controls the family-wise error at delta for any order fixed in advance."""
    k = 0
    for p in np.asarray(pvalues, dtype=np.float64).ravel():
        if not p <= delta:
            break
        k += 1
    return k


def crc_lambda(losses: torch.Tensor, alpha: float, bound: float = 1.0) -> int | None:
    """Conformal risk control's lambda-hat as an index into increasing lambdas.

    ``losses`` is (n, T): column k holds L_i(lambda_k), non-increasing in k. Returns the
    smallest k with n/(n+1) R_n(lambda_k) + B/(n+1) <= alpha (Angelopoulos et al., ICLR
    2024), or None when no lambda qualifies.
    """
    n = losses.shape[0]
    stat = (n * losses.double().mean(0) + bound) / (n + 1)   # = n/(n+1) R_n + B/(n+1)
    ok = torch.nonzero(stat <= alpha + 1e-12).view(-1)
    return int(ok[0]) if ok.numel() else None


# -- checks -----------------------------------------------------------------------------------

def check_guarantee_options(method: str, risk: str, alpha: float, delta: float,
                            labeled: bool = True, order_fraction: float = 0.3) -> None:
    """Refuse an unknown method or risk, alpha / delta / order_fraction outside (0, 1), and a
    risk that needs labels on unlabeled data, each in one line (before any data is read)."""
    if method not in METHODS:
        raise unknown_name("guarantee method", method, METHODS)
    check_risk(risk, labeled)
    for name, value in (("alpha", alpha), ("delta", delta), ("order_fraction", order_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise EENetError(f"{name} must be a number in (0, 1), got {value!r}")


def split_sizes(n: int, order_fraction: float) -> tuple[int, int]:
    """(ordering, testing) sizes of a calibration split of n samples."""
    n_order = min(n - 1, max(1, round(order_fraction * n)))
    return n_order, n - n_order


def min_test_samples(method: str, alpha: float, delta: float) -> int:
    """Testing samples below which even zero observed risk certifies nothing."""
    if method == "crc":  # (n * 0 + 1) / (n + 1) <= alpha
        return max(1, math.ceil(1 / alpha - 1 - 1e-9))
    return hb_min_samples(alpha, delta)


def check_calibration_size(n: int, method: str, alpha: float, delta: float,
                           order_fraction: float = 0.3) -> None:
    """Refuse a calibration split too small for alpha and delta, naming the size needed."""
    need = min_test_samples(method, alpha, delta)
    n_test = split_sizes(n, order_fraction)[1] if n >= 2 else 0
    if n_test >= need:
        return
    total = max(2, need)
    while split_sizes(total, order_fraction)[1] < need:
        total += 1
    why = ("(n*0 + 1)/(n+1) <= alpha" if method == "crc"
           else f"zero observed risk has p = (1 - alpha)^n <= delta={delta:g}")
    raise EENetError(f"a calibration split of {n} samples is too small for guarantee={method} "
                     f"alpha={alpha:g} delta={delta:g}: it tests on {n_test} of them "
                     f"(order_fraction={order_fraction:g}) and needs at least {need}, where {why}; "
                     f"give at least {total} samples, or a larger alpha or delta")


# -- paths ------------------------------------------------------------------------------------

def quantile_path(calibrator: Calibrator, points: int = 256) -> torch.Tensor:
    """(T, N) threshold vectors (score units) ordered from the safe end: the final exit alone
    (every threshold ``inf``), then one shared quantile level q of each exit's scores, from
    q = 1 down to q = 0 (every sample at exit 0). Each threshold only falls along the path, so
    each sample only moves to earlier exits. Every threshold is valid for the policy."""
    policy = calibrator.policy
    levels = torch.linspace(1, 0, points, dtype=torch.float64)
    # quantiles that are scores of samples ("lower"), so that patience's stay whole run lengths
    q = torch.quantile(calibrator.scores.double(), levels, dim=0, interpolation="lower")
    q = q.to(calibrator.scores.dtype)
    if policy.name == "patience":  # run length >= k  <=>  run length > k - 0.5
        below = q - 0.5
    else:  # just below the quantile, so that its own sample leaves too
        below = torch.nextafter(q, torch.tensor(-math.inf, dtype=q.dtype))
        lo, _ = policy.valid_range  # e.g. a confidence score of exactly 0: "always leave"
        always = policy.to_score_units(torch.tensor(policy.always_leave, dtype=q.dtype))
        below = torch.where(policy.from_score_units(below) > lo, below, always)
    path = torch.cat([torch.full((1, calibrator.n), math.inf, dtype=below.dtype), below])
    keep = torch.ones(path.shape[0], dtype=torch.bool)
    keep[1:] = (path[1:] != path[:-1]).any(1)
    return path[keep]


def greedy_path(view: Calibrator, stop_risk: float, lookahead: int = 8) -> torch.Tensor:
    """(T, N) threshold vectors (score units): a greedy walk along the (risk, cost) Pareto
    front of ``view`` (a :func:`risk_view` of the ordering part), from the final exit alone.

    Each step tries the next ``lookahead`` lower candidates (the threshold search's per-exit
    candidates) of every exit's threshold (every candidate for an exit still at ``inf``, whose
    head costs nothing until it releases samples) and takes the move that saves the most cost
    per unit of added risk (a move that saves cost at no added risk first), until the risk
    exceeds ``stop_risk``. The path is the sequence of vectors taken. Each step lowers one
    threshold, so samples only move to earlier exits along it and the risk on new samples rises
    almost monotonically, which suits fixed-sequence testing: on the MNIST model of
    experiments/guarantee (alpha 0.5 points, 40 calibration sets of 5,000) testing the Pareto
    front of every vector the walk evaluated, ordered by risk as Pareto Testing does, stopped
    earlier (mean cost 0.195 against 0.157 along the walk): its order is not nested, so the
    testing part's risk jumps up and down along it and the test stops at the first jump.
    """
    never = torch.full((1, view.n), math.inf, dtype=view.scores.dtype)
    acc, cost, _ = view.evaluate(never)
    cur, r, c = never[0], 1 - float(acc[0]), float(cost[0])
    steps = [never]
    while r <= stop_risk:
        moves = []
        for i, cand in enumerate(view.candidates):
            lower = cand[cand < cur[i]].to(cur.dtype)
            if not math.isinf(float(cur[i])):  # from "never leave" every candidate, then a few steps
                lower = lower[-lookahead:]
            if lower.numel():
                m = cur.repeat(lower.numel(), 1)
                m[:, i] = lower
                moves.append(m)
        if not moves:
            break
        moves = torch.cat(moves)
        acc, cost, _ = view.evaluate(moves)
        saving, added = c - cost.double(), (1 - acc.double()) - r
        saves = saving > 1e-12
        if not saves.any():
            break
        free = saves & (added <= 1e-12)
        gain = torch.where(free, saving, -math.inf) if free.any() else torch.where(
            saves, saving / added.clamp_min(1e-12), -math.inf)
        j = int(torch.argmax(gain))
        cur, r, c = moves[j], 1 - float(acc[j]), float(cost[j])
        steps.append(cur.view(1, -1))
    return torch.cat(steps)


def path_losses(view: Calibrator, path: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: each sample's loss under each of the T threshold vectors of ``path``
    (``view`` a :func:`risk_view`)."""
    return torch.stack([~view.correct_at(t) for t in path], 1)


# -- result -----------------------------------------------------------------------------------

@dataclass
class GuaranteeResult:
    """Certified thresholds and how they were certified (``to_dict``: results.json's ``guarantee``).

    ``chosen`` is measured on the whole calibration split (thresholds in the policy's
    units, ``inf``: never leave there). ``risk_test`` is its empirical risk on the testing
    part, ``p_value`` its Hoeffding-Bentkus p-value there (ltt, ucb), ``bound`` its
    Hoeffding-Bentkus upper confidence bound at level 1 - delta (ltt, ucb) or CRC's
    statistic (n R_n + 1)/(n + 1) of the monotone loss (crc). ``smallest_alpha``: the
    smallest alpha at which this path certifies a point cheaper than the final exit alone
    (None when none can be). ``empirical`` / ``optimism``: the uncorrected search for the
    same risk and its K-fold optimism-corrected version on the whole calibration split;
    ``cost_of_guarantee`` = chosen.avg_cost - empirical's avg_cost.
    """

    method: str
    risk: str
    alpha: float
    delta: float
    policy: str
    guarantee: str
    n: int
    n_order: int
    n_test: int
    order_fraction: float
    seed: int
    certified: bool
    early_exit_certified: bool
    chosen: OperatingPoint
    risk_calibration: float
    risk_test: float
    p_value: float | None
    bound: float
    path_length: int
    certified_count: int
    smallest_alpha: float | None
    message: str
    labeled: bool = True
    empirical: dict | None = None
    optimism: dict | None = None
    cost_of_guarantee: float | None = None
    score_thresholds: list[float] = field(default_factory=list)  # chosen, in score units

    def to_dict(self) -> dict:
        chosen = self.chosen.to_dict()
        if not self.labeled:
            chosen["accuracy"] = None
        return {"method": self.method, "risk": self.risk, "alpha": self.alpha, "delta": self.delta,
                "policy": self.policy, "guarantee": self.guarantee, "certified": self.certified,
                "early_exit_certified": self.early_exit_certified, "message": self.message,
                "n": self.n, "n_order": self.n_order, "n_test": self.n_test,
                "order_fraction": self.order_fraction, "seed": self.seed,
                "thresholds": chosen["thresholds"], "chosen": chosen,
                "risk_calibration": self.risk_calibration, "risk_test": self.risk_test,
                "p_value": self.p_value, "bound": self.bound, "path_length": self.path_length,
                "certified_count": self.certified_count, "smallest_alpha": self.smallest_alpha,
                "empirical": self.empirical, "optimism": self.optimism,
                "cost_of_guarantee": self.cost_of_guarantee}


# -- the call ---------------------------------------------------------------------------------

def certify(cached: CachedExits, policy: str, cost: CostTable | Sequence[float], method: str = "ltt",
            risk: str = "drop", alpha: float = 0.01, delta: float = 0.1, **kw) -> GuaranteeResult:
    """The cheapest thresholds of ``policy`` whose ``risk`` is certified at ``alpha`` by ``method``.

    ``cached``: every exit's outputs on the calibration split (``cache_exit_outputs`` on
    val, or on unlabeled deployment data with negative targets for ``risk="disagree"``);
    ``cost``: the run's cost table. Keywords as :func:`certify_with` (plus ``grid``, the
    threshold search's candidates per exit). Every mistake (method, risk, alpha, delta,
    labels, a split too small) raises :class:`EENetError` before any work.
    """
    labeled = has_labels(cached)
    check_guarantee_options(method, risk, alpha, delta, labeled, kw.get("order_fraction", 0.3))
    check_calibration_size(len(cached), method, alpha, delta, kw.get("order_fraction", 0.3))
    cal = Calibrator(cached, policy, cost, grid=kw.pop("grid", 64))
    return certify_with(cal, exit_losses(cached, risk), risk, method, alpha, delta, labeled=labeled, **kw)


def certify_with(cal: Calibrator, losses: torch.Tensor, risk: str, method: str = "ltt",
                 alpha: float = 0.01, delta: float = 0.1, order_fraction: float = 0.3, seed: int = 0,
                 points: int = 256, baselines: bool = True, optimism_folds: int = 5,
                 optimism_repeats: int = 1, labeled: bool = True) -> GuaranteeResult:
    """:func:`certify` on a built :class:`Calibrator` and its (B, N+1) losses (``exit_losses``).

    Args:
        order_fraction: the share of the calibration split that orders the path (the rest
            tests it), cut by ``torch.randperm(B, generator=manual_seed(seed))``.
        points: quantile levels of the ucb / crc path.
        baselines: also run the uncorrected search and its ``optimism_folds``-fold
            correction (averaged over ``optimism_repeats`` shuffles; 0 folds: skip it).
    """
    check_guarantee_options(method, risk, alpha, delta, labeled, order_fraction)
    b = cal.scores.shape[0]
    check_calibration_size(b, method, alpha, delta, order_fraction)
    view = risk_view(cal, losses)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    n_order, n_test = split_sizes(b, order_fraction)
    order_view, test_view = view.subset(perm[:n_order]), view.subset(perm[n_order:])
    final_safe = risk in ("drop", "disagree")  # zero loss at the final exit, on every sample

    if method == "ltt":
        path = greedy_path(order_view, 1.5 * alpha)  # beyond 1.5 alpha: certified by rare luck only
    else:
        path = quantile_path(order_view, points)
    _, cost_full, _ = view.evaluate(path)
    never_cost = float(view.evaluate(torch.full((1, cal.n), math.inf))[1][0])
    cheaper = cost_full < never_cost - 1e-12

    if method == "crc":
        mono_test = risk_view(test_view, monotone_losses(~test_view.correct))
        per_sample = path_losses(mono_test, path)                    # (n_test, T), safe end first
        j = crc_lambda(per_sample.flip(1), alpha)  # lambda rises toward the safe end
        k = 0 if j is None else path.shape[0] - j  # certified: every lambda >= lambda-hat
        risk_t = per_sample.double().mean(0).numpy()
        bounds, pvals = (n_test * risk_t + 1) / (n_test + 1), None  # n/(n+1) R_n + B/(n+1)
        smallest = float(bounds[cheaper.numpy()].min()) if cheaper.any() else None
    else:
        risk_t = (1 - test_view.evaluate(path)[0].double()).numpy()
        pvals = hb_pvalue(risk_t, n_test, alpha)
        k = fixed_sequence(pvals, delta)
        bounds = hb_upper_bound(risk_t, n_test, delta)
        reach = np.maximum.accumulate(bounds)  # alpha needed to reject every point up to each
        smallest = float(reach[cheaper.numpy()].min()) if cheaper.any() else None
    if smallest is not None and smallest >= 1:
        smallest = None

    i = int(torch.argmin(cost_full[:k])) if k else None
    early = i is not None and bool(cheaper[i])
    if early:
        vec = path[i]
        risk_test = float(risk_t[i])
        bound, p_value = float(bounds[i]), (None if pvals is None else float(pvals[i]))
        certified = True
    else:  # nothing cheaper than the final exit alone is certified: return that
        vec = torch.full((cal.n,), math.inf, dtype=path.dtype)
        never = vec.view(1, -1)
        risk_test = 1 - float((mono_test if method == "crc" else test_view).evaluate(never)[0][0])
        bound = ((n_test * risk_test + 1) / (n_test + 1) if method == "crc"
                 else float(hb_upper_bound(risk_test, n_test, delta)[0]))
        p_value = None if method == "crc" else float(hb_pvalue(risk_test, n_test, alpha))
        # drop / disagree: zero loss on every sample; error: certified if on the certified prefix
        certified = final_safe or bool(torch.isposinf(path[:k]).all(1).any())
    chosen = cal.point(vec)
    full_risk = 1 - float(view.evaluate(vec.view(1, -1))[0][0])
    name = {"ltt": "Learn then Test", "ucb": "the UCB", "crc": "conformal risk control"}[method]
    at = f"{risk} risk <= {alpha:g}" + ("" if method == "crc" else f" with probability >= {1 - delta:g}")
    if early:
        message = (f"{name} certifies {risk} risk <= {alpha:g}: average cost fraction "
                   f"{chosen.avg_cost:.4f} ({k} of {path.shape[0]} path points certified on "
                   f"{n_test} testing samples)")
    else:
        where = (f"the smallest alpha that certifies one on this path is {smallest:.4g}" if smallest
                 is not None else "no alpha below 1 certifies one on this path")
        fallback = ("returning the final-exit-only point (zero risk)" if final_safe else
                    ("returning the final-exit-only point" if certified else
                     f"not even the final exit alone (its bound is {bound:.4g}); returning the "
                     f"final-exit-only point, uncertified"))
        message = (f"alpha={alpha:g} is too small for {name} to certify a threshold vector that "
                   f"exits early ({at}, {n_test} testing samples): {where}; {fallback}")
    result = GuaranteeResult(
        method=method, risk=risk, alpha=float(alpha), delta=float(delta), policy=cal.policy.name,
        guarantee=METHODS[method], n=b, n_order=n_order, n_test=n_test,
        order_fraction=float(order_fraction), seed=int(seed), certified=certified,
        early_exit_certified=early, chosen=chosen, risk_calibration=full_risk, risk_test=risk_test,
        p_value=p_value, bound=bound, path_length=int(path.shape[0]), certified_count=int(k),
        smallest_alpha=smallest, message=message, labeled=labeled,
        score_thresholds=[json_float(t) for t in vec.double().tolist()])
    if baselines:
        result.empirical = empirical_search(cal, losses, alpha)
        if optimism_folds:
            result.optimism = empirical_search(cal, losses, alpha, optimism_folds, seed,
                                               optimism_repeats)
        if result.empirical["reachable"]:
            result.cost_of_guarantee = chosen.avg_cost - result.empirical["avg_cost"]
    return result


def empirical_search(cal: Calibrator, losses: torch.Tensor, alpha: float, optimism_folds: int = 0,
                     seed: int = 0, optimism_repeats: int = 1) -> dict:
    """The uncorrected threshold search for empirical risk <= alpha on the whole split (no
    guarantee), or with ``optimism_folds`` its K-fold optimism correction (Efron's optimism,
    as :meth:`Calibrator.optimism`). Returns the point, its thresholds and its risk."""
    view = risk_view(cal, losses)
    final_risk = float(losses[:, -1].double().mean())
    out = {"search": "optimism" if optimism_folds else "empirical", "alpha": float(alpha)}
    if alpha < final_risk:
        never = torch.full((cal.n,), math.inf)
        p = cal.point(never)
        return {**out, "reachable": False, "thresholds": [json_float(t) for t in p.thresholds],
                "accuracy": p.accuracy, "avg_cost": p.avg_cost, "risk": final_risk,
                "message": f"alpha={alpha:g} is below the final exit's own risk {final_risk:.4g}"}
    # tolerance (points) below the final exit's "accuracy" 1 - final_risk: risk <= alpha
    res = view.calibrate(tolerance=100 * (alpha - final_risk), optimism_folds=optimism_folds,
                         optimism_seed=seed, optimism_repeats=optimism_repeats)
    vec = view.score_vector(res.chosen.thresholds)
    p = cal.point(vec)
    out.update(reachable=bool(res.reachable), thresholds=[json_float(t) for t in p.thresholds],
               score_thresholds=[json_float(t) for t in vec.tolist()],
               accuracy=p.accuracy, avg_cost=p.avg_cost, risk=1 - res.chosen.accuracy)
    if optimism_folds:
        o = res.target["optimism"]
        out.update(optimism_points=o["optimism_points"], folds=o["folds"], repeats=o["repeats"],
                   effective_alpha=final_risk + o["effective_tolerance"] / 100)
    return out
