"""Calibrated exit confidences: per-exit temperature scaling and expected calibration error.

Temperature scaling (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern
Neural Networks", ICML 2017, Sec. 4.2) divides exit i's logits z by one scalar
T_i > 0, fitted on the validation split by minimising the negative log-likelihood

    NLL_i(T) = -1/B sum_b log softmax(z_b / T)[y_b].

Dividing by T > 0 keeps every argmax, so predictions, per-exit accuracies and
the paper's accuracy figures do not change; what changes is the confidence the
``max_prob`` and ``entropy`` policies score (max_k p[k] and -H(p) of
p = softmax(z / T)), and so which samples a threshold releases. The
policies carry the temperatures themselves (``eenet.policies``:
``create_policy(name, thresholds, temperatures)``), so that the calibration on
cached outputs (``Calibrator(..., temperatures=...)``), the static path, the
dynamic engine and the ONNX runner all score z / T. The ``confidence`` policy
scores its own head and ``patience`` the argmaxes: neither takes a temperature.
:func:`apply_temperatures` returns cached outputs with scaled logits (for the
calibration error after scaling and the reliability diagrams).

Fitting. With beta = 1/T,

    NLL(beta) = mean_b [logsumexp_k(beta z_bk) - beta z_by]

is convex in beta (a log-sum-exp of a linear function minus a linear one):
dNLL/dbeta = mean_b [E_{p_b}[z_b] - z_by] and d2NLL/dbeta2 = mean_b Var_{p_b}[z_b] >= 0,
with p_b = softmax(beta z_b). The derivative is therefore non-decreasing and its
zero is the global minimum; :func:`fit_temperature` finds it by bisection on the
derivative's sign over log T in [t_min, t_max] (no step size to tune, always
converges). A minimum outside that interval is clamped to its end and flagged
(``at_bound``): e.g. an exit that classifies every validation sample correctly
has an NLL that keeps falling as T -> 0.

Expected calibration error (Naeini, Cooper and Hauskrecht, AAAI 2015; Guo et
al., eq. 3) with M equal-width bins I_m = ((m-1)/M, m/M] of the confidence
conf_b = max_k p_b[k]:

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|,

acc(B_m) and conf(B_m) being the accuracy and mean confidence of the samples in
bin m. M = 15 as in Guo et al.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from eenet.calibration.cache import CachedExits
from eenet.errors import EENetError
from eenet.policies import check_temperatures

#: Bins of the expected calibration error (Guo et al. use 15).
ECE_BINS = 15
#: Interval the fitted temperatures are searched in.
T_MIN, T_MAX = 1e-2, 1e2


@dataclass
class TemperatureFit:
    """Per-exit temperatures (exits 0..N, the final one included) and the fit's NLL."""

    temperatures: list[float]
    nll_before: list[float]   # at T = 1, on the fitting split
    nll_after: list[float]    # at the fitted T, on the fitting split
    at_bound: list[bool]      # the NLL minimum lies outside [t_min, t_max]: T clamped
    samples: int

    def to_dict(self) -> dict:
        return {"temperatures": self.temperatures, "nll_before": self.nll_before,
                "nll_after": self.nll_after, "at_bound": self.at_bound, "samples": self.samples}


# -- checks -------------------------------------------------------------------------------------

def _check_labels(logits: torch.Tensor, targets: torch.Tensor | None, what: str) -> torch.Tensor:
    """Targets as a (B,) long tensor of class indices for ``logits`` (B, K), or one error line."""
    if targets is None or targets.numel() == 0:
        raise EENetError(f"{what} needs labelled samples: no targets given")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise EENetError(f"{what} needs one target per sample: {tuple(targets.shape)} targets "
                         f"for {logits.shape[0]} samples")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise EENetError(f"{what} needs integer class indices as targets, got {targets.dtype}")
    k = logits.shape[1]
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= k:
        raise EENetError(f"{what} needs labelled samples with classes in 0..{k - 1}, got targets "
                         f"in {lo}..{hi} (negative targets mark unlabelled samples)")
    return targets.long()


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise EENetError(f"ECE bins must be an integer >= 1, got {bins!r}")
    return bins


# -- fitting ------------------------------------------------------------------------------------

def _nll(z: torch.Tensor, y: torch.Tensor, beta: float) -> float:
    return float(F.cross_entropy(z * beta, y))


def _dnll_dbeta(z: torch.Tensor, y: torch.Tensor, beta: float) -> float:
    """mean_b [E_{p_b}[z_b] - z_by] with p_b = softmax(beta z_b): the NLL's slope in beta."""
    p = torch.softmax(z * beta, dim=1)
    return float(((p * z).sum(1) - z.gather(1, y.view(-1, 1)).view(-1)).mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, t_min: float = T_MIN,
                    t_max: float = T_MAX, tol: float = 1e-9) -> tuple[float, bool]:
    """The NLL-minimising temperature of one exit's logits (B, K), and whether it was clamped.

    Bisection on the sign of dNLL/dbeta (beta = 1/T; see the module docstring) over
    log T in [t_min, t_max], until the interval is ``tol`` wide in log T.
    """
    if not (0 < t_min < t_max and math.isfinite(t_max)):
        raise EENetError(f"temperature bounds must satisfy 0 < t_min < t_max < inf, got "
                         f"t_min={t_min}, t_max={t_max}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise EENetError(f"temperature scaling needs logits of shape (samples, classes >= 2), got "
                         f"{tuple(logits.shape)}")
    y = _check_labels(logits, targets, "temperature scaling")
    z = logits.detach().to(torch.float64)
    if not torch.isfinite(z).all():
        raise EENetError("temperature scaling needs finite logits (found inf or nan)")
    lo, hi = math.log(t_min), math.log(t_max)  # log T; the slope in beta falls as log T rises
    # still falling at the largest beta (or flat: every p_b[y_b] rounds to 1), minimum below t_min
    if _dnll_dbeta(z, y, 1 / t_min) <= 0:
        return t_min, True
    if _dnll_dbeta(z, y, 1 / t_max) > 0:  # already rising at the smallest beta: above t_max
        return t_max, True
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if _dnll_dbeta(z, y, math.exp(-mid)) > 0:  # beta too large: T too small
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi)), False


def fit_temperatures(cached: CachedExits, t_min: float = T_MIN, t_max: float = T_MAX
                     ) -> TemperatureFit:
    """One temperature per exit (the final exit included), fitted by NLL on ``cached``.

    ``cached`` is the validation split (:func:`eenet.calibration.cache_exit_outputs`);
    fitting on test would tune on the split the results are reported on.
    """
    temps, before, after, clamped = [], [], [], []
    for i, lg in enumerate(cached.logits):
        t, bound = fit_temperature(lg, cached.targets, t_min, t_max)
        z, y = lg.to(torch.float64), cached.targets.long()
        temps.append(t)
        clamped.append(bound)
        before.append(_nll(z, y, 1.0))
        after.append(_nll(z, y, 1 / t))
    return TemperatureFit(temps, before, after, clamped, len(cached))


def apply_temperatures(cached: CachedExits, temperatures: Sequence[float]) -> CachedExits:
    """The same cached outputs with exit i's logits divided by T_i (confidence logits and
    targets unchanged); every argmax, hence every prediction, stays the same."""
    temps = check_temperatures(temperatures, len(cached.logits))
    logits = [lg / t for lg, t in zip(cached.logits, temps)]  # z / 1.0 is z exactly
    return CachedExits(logits, [z.clone() for z in cached.conf_logits], cached.targets.clone())


# -- calibration error --------------------------------------------------------------------------

def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS
                     ) -> dict:
    """Per-bin sample count, accuracy and mean confidence over bins ((m-1)/M, m/M].

    Empty bins have accuracy and confidence ``None``. ``ece`` is the weighted gap
    sum_m |B_m|/n |acc(B_m) - conf(B_m)|.
    """
    bins = _check_bins(bins)
    conf = confidence.detach().to(torch.float64).view(-1)
    ok = correct.detach().to(torch.float64).view(-1)
    if conf.numel() == 0 or conf.numel() != ok.numel():
        raise EENetError(f"ECE needs one correctness per confidence and at least one sample, got "
                         f"{conf.numel()} confidences and {ok.numel()} correctness values")
    if not ((conf >= 0) & (conf <= 1)).all():
        raise EENetError("ECE needs confidences in [0, 1]")
    # bin m (0-based) holds m/M < conf <= (m+1)/M; conf = 0 joins the first bin
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).to(torch.float64)
    acc_sum = torch.bincount(index, weights=ok, minlength=bins)
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    n = conf.numel()
    ece = float((acc_sum - conf_sum).abs().sum() / n)  # |B_m|/n |acc - conf| = |sum ok - sum conf|/n
    filled = count > 0
    return {"bins": bins, "edges": torch.linspace(0, 1, bins + 1).tolist(),
            "count": count.long().tolist(),
            "accuracy": [float(a / c) if f else None for a, c, f in zip(acc_sum, count, filled)],
            "confidence": [float(s / c) if f else None for s, c, f in zip(conf_sum, count, filled)],
            "ece": ece}


def exit_reliability(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """:func:`reliability_bins` of one exit's logits: confidence max softmax, correct argmax."""
    y = _check_labels(logits, targets, "ECE")
    p = torch.softmax(logits.detach().to(torch.float64), dim=1)
    conf, pred = p.max(1)
    return reliability_bins(conf, pred == y, bins)


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS
                               ) -> float:
    """ECE of one exit's logits (B, K) against the targets (B,), ``bins`` equal-width bins."""
    return exit_reliability(logits, targets, bins)["ece"]


def exit_calibration_errors(cached: CachedExits, bins: int = ECE_BINS) -> list[float]:
    """ECE of every exit (the final one included) on a cached split."""
    return [expected_calibration_error(lg, cached.targets, bins) for lg in cached.logits]


#: How the temperatures were fitted, as the reports say it.
METHOD = "temperature scaling (Guo et al., ICML 2017), fitted by NLL on val"


def split_calibration_errors(temperatures: Sequence[float], cached: CachedExits,
                             bins: int = ECE_BINS) -> dict:
    """Per-exit ECE of a split's unscaled outputs ``cached`` before and after dividing exit
    i's logits by T_i, and their sums over the exits (the final exit included)."""
    before = exit_calibration_errors(cached, bins)
    after = exit_calibration_errors(apply_temperatures(cached, temperatures), bins)
    return {"samples": len(cached), "ece_before": before, "ece_after": after,
            "ece_sum_before": sum(before), "ece_sum_after": sum(after)}


def temperature_report(fit: TemperatureFit, cached: CachedExits, bins: int = ECE_BINS) -> dict:
    """What ``results.json`` records for a split: the fit, and per-exit ECE before and after.

    ``cached`` holds unscaled outputs of the split reported on (test, normally).
    """
    return {"method": METHOD, "fit": fit.to_dict(), "ece_bins": bins,
            **split_calibration_errors(fit.temperatures, cached, bins)}
