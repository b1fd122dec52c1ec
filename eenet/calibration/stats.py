"""Statistics of operating points: the paired accuracy drop and Pareto fronts."""

from __future__ import annotations

import math

import torch

from eenet.errors import EENetError


def paired_drop(reference_correct: torch.Tensor, policy_correct: torch.Tensor) -> dict:
    """Accuracy drop of a policy against a reference on the same samples, with its standard error.

    Both are per-sample correctness (B,). The per-sample difference d_b =
    ref_b - pol_b is -1, 0 or 1; the drop is mean(d) and its standard error
    std(d) / sqrt(B) (the paired difference of two proportions, as in McNemar's
    test): only the samples on which the two disagree make it uncertain. In
    accuracy points, like a tolerance.
    """
    d = reference_correct.double() - policy_correct.double()
    n = d.numel()
    if n < 2:
        raise EENetError(f"a paired drop needs at least 2 samples, got {n}")
    return {"drop_points": 100 * float(d.mean()),
            "se_points": 100 * float(d.std(unbiased=True)) / math.sqrt(n),
            "discordant": float((d != 0).double().mean())}


def pareto_indices(acc: torch.Tensor, cost: torch.Tensor, keep_all: bool = False) -> list[int]:
    """Indices of the non-dominated points (lower cost, higher accuracy), by increasing cost.

    With ``keep_all`` every distinct (cost, accuracy) point is kept, sorted by cost
    (the raw curve for plots).
    """
    pts = sorted(range(len(acc)), key=lambda k: (float(cost[k]), -float(acc[k])))
    out, best_acc, seen = [], -1.0, set()
    for k in pts:
        key = (round(float(cost[k]), 12), round(float(acc[k]), 12))
        if keep_all:
            if key not in seen:
                seen.add(key)
                out.append(k)
        elif float(acc[k]) > best_acc + 1e-12:
            best_acc = float(acc[k])
            out.append(k)
    return out
