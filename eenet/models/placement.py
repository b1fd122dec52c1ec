"""Where exits go: an explicit list of stages, or a distribution over the backbone's MACs.

Demir & Akbas (EENets), section 3.3, place N early exits by a distribution of
the computational cost. With F the backbone's MACs and i = 0..N-1 the target
cost of exit i is

    fine:       T_i = F * (1 - 0.95^(i+1))
    pareto:     T_i = F * (1 - 0.8^(i+1))
    linear:     T_i = F * (i+1) / (N+1)
    gold_ratio: T_i = F * phi^(i-N),   phi = (1 + sqrt 5) / 2

and exit i goes after the first stage whose cumulative MACs (stem and stages
0..k) reach T_i. A stage holds at most one exit: when that stage is taken, the
exit moves to the next free stage. Exits never go after the last stage (the
final exit is there already). When the N exits do not fit, a clear error.
"""

from __future__ import annotations

import math
from typing import Sequence

from eenet.errors import EENetError

PHI = (1 + math.sqrt(5)) / 2

DISTRIBUTIONS = {
    "fine": lambda i, n: 1 - 0.95 ** (i + 1),
    "pareto": lambda i, n: 1 - 0.8 ** (i + 1),
    "linear": lambda i, n: (i + 1) / (n + 1),
    "gold_ratio": lambda i, n: PHI ** (i - n),
}
METHODS = ("explicit", *DISTRIBUTIONS)


def cost_targets(method: str, num_exits: int, total_macs: float) -> list[float]:
    """T_0..T_{N-1} for a distribution (see module docstring)."""
    if method not in DISTRIBUTIONS:
        raise EENetError(f"unknown exit placement '{method}'; accepted: {', '.join(METHODS)}")
    return [total_macs * DISTRIBUTIONS[method](i, num_exits) for i in range(num_exits)]


def check_explicit(stages: Sequence[int], num_stages: int) -> list[int]:
    """Validate an explicit list of exit stages: increasing, unique, before the last stage."""
    stages = [int(s) for s in stages]
    last = num_stages - 2
    for s in stages:
        if not 0 <= s <= last:
            raise EENetError(f"exit stage {s} is out of range: early exits may attach after "
                             f"stages 0..{last} of this {num_stages}-stage backbone")
    if len(set(stages)) != len(stages) or sorted(stages) != stages:
        raise EENetError(f"exit stages must be strictly increasing and unique, got {stages}")
    return stages


def place_exits(method: str, num_exits: int, cumulative_macs: Sequence[float],
                total_macs: float, stages: Sequence[int] | None = None) -> list[int]:
    """Stage index after which each early exit attaches.

    Args:
        method: ``explicit`` or a distribution name (``fine``, ``pareto``, ``linear``, ``gold_ratio``).
        num_exits: N, the number of early exits (the final exit is not counted).
        cumulative_macs: MACs of stem plus stages 0..k, for every stage k.
        total_macs: F, MACs of the whole backbone (head included).
        stages: the list for ``explicit``.
    """
    num_stages = len(cumulative_macs)
    if method == "explicit":
        if stages is None:
            raise EENetError("exit placement 'explicit' needs a list of stages (placement.stages)")
        return check_explicit(stages, num_stages)
    if stages:
        raise EENetError(f"placement.stages is only used with placement 'explicit', not '{method}'")
    if num_exits < 1:
        raise EENetError(f"number of exits must be >= 1 for placement '{method}', got {num_exits}")
    positions: list[int] = []
    for i, target in enumerate(cost_targets(method, num_exits, total_macs)):
        k = next((k for k, c in enumerate(cumulative_macs) if c >= target), num_stages)
        if positions:
            k = max(k, positions[-1] + 1)
        if k > num_stages - 2:
            raise EENetError(
                f"{num_exits} exits do not fit with placement '{method}': exit {i} "
                f"(target {target / total_macs:.3f} of the backbone's MACs) has no free stage "
                f"before the last of {num_stages}; use fewer exits or another placement")
        positions.append(k)
    return positions
