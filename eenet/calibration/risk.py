"""Bounded per-sample losses of early exiting, whose mean is the risk a guarantee controls.

For cached exit outputs (:class:`~eenet.calibration.cache.CachedExits`) every
sample b and every exit j (0..N, N the final exit) get a loss L[b, j] in
{0, 1}: what it costs to let sample b leave at exit j. A threshold vector t
sends b to exit e_t(b) (``eenet.policies.first_exit``), and its risk is

    R(t) = E[ L[b, e_t(b)] ],   estimated by  R_n(t) = (1/n) sum_b L[b, e_t(b)].

Risks (y the label, yhat_j the prediction of exit j, N the final exit):

- ``drop``:     L[b, j] = max(0, 1[yhat_j != y] - 1[yhat_N != y])
  (the "label gap": 1 when exit j is wrong where the final exit is right).
  Since 1[yhat_j != y] - 1[yhat_N != y] <= L[b, j], R(t) bounds the accuracy
  drop against the final exit from above. Zero at the final exit.
- ``disagree``: L[b, j] = 1[yhat_j != yhat_N]; needs no labels, so it can be
  calibrated on unlabeled data from the deployment distribution. It also bounds
  the drop: 1[yhat_j != y] - 1[yhat_N != y] <= 1[yhat_j != yhat_N]. Zero at the
  final exit.
- ``error``:    L[b, j] = 1[yhat_j != y], against an absolute target.

Unlabeled samples carry a negative target (-1, as torchvision's unlabeled STL-10
split does); ``drop`` and ``error`` refuse them.

Risk control computes R_n(t) for many t with the existing
:meth:`Calibrator.evaluate <eenet.calibration.search.Calibrator.evaluate>`,
through :func:`risk_view`: a calibrator whose per-exit "correct" matrix is
1 - L, so its accuracy is 1 - R_n(t) and its cost is unchanged.

The losses along a path of thresholds are not monotone in general (a sample
wrong at exit 0, right at exit 1, wrong at exit 2 gains and loses loss as it
moves later). Conformal risk control needs a monotone loss:
:func:`monotone_losses` replaces L[b, j] by max_{k >= j} L[b, k], which is at
least L[b, j] (so controlling it controls L) and does not increase as the
sample moves to a later exit.
"""

from __future__ import annotations

import copy

import torch

from eenet.calibration.cache import CachedExits
from eenet.errors import EENetError, unknown_name

#: Every risk, with its per-sample loss at exit j (N: the final exit) and whether it needs labels.
RISKS = {
    "drop": ("max(0, 1[exit j wrong] - 1[final exit wrong]), an upper bound of the accuracy drop "
             "against the final exit", True),
    "disagree": ("1[exit j's prediction != the final exit's], needs no labels", False),
    "error": ("1[exit j wrong], the error rate against an absolute target", True),
}


def has_labels(cached: CachedExits) -> bool:
    """Whether every sample has a label (unlabeled samples carry a negative target)."""
    return cached.targets.numel() > 0 and bool((cached.targets >= 0).all())


def check_risk(risk: str, labeled: bool) -> None:
    """Refuse an unknown risk, or a risk that needs labels on unlabeled data (one line)."""
    if risk not in RISKS:
        raise unknown_name("risk", risk, RISKS)
    if RISKS[risk][1] and not labeled:
        raise EENetError(f"risk={risk} needs labels, and the calibration data has unlabeled samples "
                         f"(negative targets); use risk=disagree, which needs none")


def exit_losses(cached: CachedExits, risk: str) -> torch.Tensor:
    """(B, N+1) bool: the loss L[b, j] of letting sample b leave at exit j (module docstring)."""
    check_risk(risk, has_labels(cached))
    preds = torch.stack([lg.argmax(1) for lg in cached.logits], 1)   # (B, N+1)
    if risk == "disagree":
        return preds != preds[:, -1:]
    wrong = preds != cached.targets.view(-1, 1)
    if risk == "error":
        return wrong
    return wrong & ~wrong[:, -1:]  # max(0, w_j - w_N) for w in {0, 1}


def monotone_losses(losses: torch.Tensor) -> torch.Tensor:
    """max_{k >= j} L[b, k]: an upper bound of L that does not increase along the exits."""
    return losses.flip(1).cummax(1).values.flip(1)


def risk_view(calibrator, losses: torch.Tensor):
    """A copy of ``calibrator`` whose "accuracy" is 1 - risk under ``losses`` (B, N+1).

    Everything else (scores, candidates, costs) is shared, so
    ``risk_view(cal, L).evaluate(t)`` returns (1 - R_n(t), cost(t), exit rates), and
    ``.subset``, ``.calibrate`` and ``.optimism`` work on the risk as they do on accuracy.
    """
    if losses.shape != calibrator.correct.shape:
        raise EENetError(f"losses of shape {tuple(losses.shape)} for exit outputs of shape "
                         f"{tuple(calibrator.correct.shape)}")
    view = copy.copy(calibrator)
    view.correct = ~losses.bool()
    return view
