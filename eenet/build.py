"""Assemble an early-exit network: backbone + exit block type + placement.

The one place where exit placement meets cost accounting: distributions over
the backbone's MACs (EENets' ``fine``, ``pareto``, ``linear``, ``gold_ratio``)
need the backbone traced by fvcore before any exit exists.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from eenet.cost import backbone_cost
from eenet.errors import EENetError
from eenet.models.early_exit import EarlyExitNetwork
from eenet.models.placement import place_exits
from eenet.models.staged import StagedBackbone
from eenet.models.trecx import MitigatedFinalHead

ExitFactory = Callable[..., nn.Module]


def build_early_exit_network(backbone: StagedBackbone, exit_block: ExitFactory,
                             placement: str = "fine", num_exits: int = 2,
                             stages: Sequence[int] | None = None,
                             input_size: tuple[int, int, int] | None = None,
                             mitigation: str | None = None) -> EarlyExitNetwork:
    """Attach exits to ``backbone``.

    Args:
        backbone: a staged backbone.
        exit_block: called as ``exit_block(in_channels=..., num_classes=..., in_size=(H, W))``
            for every early exit (e.g. a partial of :class:`eenet.models.ExitBlock`).
        placement: ``explicit`` or a MACs distribution (see :mod:`eenet.models.placement`).
        num_exits: number of early exits for a distribution.
        stages: stage indices for ``explicit``.
        input_size: input ``(C, H, W)``; the backbone's default when omitted.
        mitigation: ``trecx`` or ``concat`` to let the final exit use the first early
            exit (T-RecX's overthinking mitigation, :mod:`eenet.models.trecx`); None for none.
    """
    input_size = tuple(input_size or backbone.default_input_size)
    if input_size[0] != backbone.in_chans:
        raise ValueError(f"input has {input_size[0]} channels, backbone expects {backbone.in_chans}")
    if placement == "explicit":
        positions = place_exits("explicit", len(stages or []), [0] * backbone.num_stages, 1.0,
                                stages=stages)
    else:
        cost = backbone_cost(backbone, input_size)
        positions = place_exits(placement, num_exits, cost.cumulative, cost.total, stages=stages)
    shapes = backbone.stage_shapes(input_size)
    exits = [exit_block(in_channels=shapes[s][0], num_classes=backbone.num_classes,
                        in_size=tuple(shapes[s][1:])) for s in positions]
    fixed = any(getattr(e, "preblock", "pool") == "plain" for e in exits)
    final_head, carry = None, None
    if mitigation:
        if not exits:
            raise EENetError(f"mitigation '{mitigation}' needs an early exit")
        final_head = MitigatedFinalHead(mitigation, backbone.head, exits[0],
                                        backbone.stage_info[-1].channels, backbone.num_classes)
        carry = 0 if final_head.needs_carry else None
    return EarlyExitNetwork(backbone, exits, positions, input_size, fixed_size=fixed,
                            final_head=final_head, carry_exit=carry)
