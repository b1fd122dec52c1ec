"""Assemble an early-exit network: backbone + exit block type + placement.

The one place where exit placement meets cost accounting: distributions over
the backbone's MACs (EENets' ``fine``, ``pareto``, ``linear``, ``gold_ratio``)
need the backbone traced by fvcore before any exit exists.

Two kinds of backbone: a :class:`StagedBackbone` (exits after stages) and any
torch.fx-traceable model (:func:`attach_exits`, or a
:class:`eenet.models.graph_backbone.GraphBackbone` from the ``torchvision``,
``timm`` and ``graph`` configs), cut into segments at named nodes or at block
outputs placed by MACs (:mod:`eenet.models.graph_split`).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from eenet.cost import backbone_cost, walk_macs
from eenet.errors import EENetError
from eenet.models.early_exit import EarlyExitNetwork
from eenet.models.graph_backbone import GraphBackbone
from eenet.models.graph_split import GraphSplitNetwork, block_outputs
from eenet.models.placement import place_exits
from eenet.models.staged import StagedBackbone
from eenet.models.trecx import MitigatedFinalHead

ExitFactory = Callable[..., nn.Module]


def attach_exits(model: nn.Module, at: Sequence[str] | None = None,
                 exit: str | ExitFactory = "pool", num_classes: int | None = None,
                 input_size: Sequence[int] = (3, 224, 224), placement: str = "fine",
                 num_exits: int = 2, stages: Sequence[int] | None = None,
                 tokens: str = "mean") -> GraphSplitNetwork:
    """Exits on any torch.fx-traceable model, with real per-sample early exit.

    ``eenet.attach_exits(model, at=["layer1", "layer2.1", "layer3"], exit="pool",
    num_classes=10, input_size=(3, 32, 32))`` cuts the model's graph after the named
    nodes (a module's name stands for its last node) into segments that carry their
    live values (:mod:`eenet.models.graph_split`). The result's static path
    returns every early exit and the model's own output; ``DynamicEngine``,
    ``exit_cost_table``, ``exit_latency_table`` and ``cache_exit_outputs`` take it.

    Args:
        model: the model (one input, one (B, K) output); shared, not copied.
        at: node names; None places the exits among the model's block outputs
            (:func:`eenet.models.graph_split.block_outputs`), by ``placement``.
        exit: ``pool``, ``bnpool``, ``plain`` or an exit factory (feature maps);
            token sequences get a :class:`eenet.models.graph_split.TokenExit`.
        num_classes: checked against the model's output width when given.
        input_size: one input's ``(C, H, W)``.
        placement: with ``at=None``: ``explicit`` (``stages``: indices among the block
            outputs) or a MACs distribution (``fine``, ``pareto``, ``linear``, ``gold_ratio``).
        num_exits: number of early exits for a distribution.
        stages: block-output indices for ``explicit``.
        tokens: ``mean`` or ``cls`` (how token exits pool).
    """
    input_size = tuple(int(v) for v in input_size)
    if at is not None:
        if isinstance(at, str):
            raise EENetError(f"at must be a list of node names, got the string {at!r}")
        return GraphSplitNetwork(model, list(at), input_size, exit=exit, num_classes=num_classes,
                                 tokens=tokens)
    candidates = block_outputs(model, input_size)
    if not candidates:
        raise EENetError(f"{type(model).__name__} has no block output a single value crosses "
                         "(every cut carries a skip connection); name the exit nodes (at=...)")
    if placement == "explicit":
        positions = place_exits("explicit", 0, [0] * (len(candidates) + 1), 1.0, stages=stages)
    else:
        probe = GraphSplitNetwork(model, candidates, input_size, exit="pool", tokens=tokens)
        bodies, _ = walk_macs(probe, probe.walk(), input_size)
        cumulative, acc = [], 0
        for b in bodies:
            acc += b
            cumulative.append(acc)
        positions = place_exits(placement, num_exits, cumulative, acc, stages=stages)
    net = GraphSplitNetwork(model, [candidates[k] for k in positions], input_size, exit=exit,
                            num_classes=num_classes, tokens=tokens)
    net.exit_stages = list(positions)
    return net


def build_early_exit_network(backbone: StagedBackbone | GraphBackbone, exit_block: ExitFactory,
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

    A :class:`GraphBackbone` goes to :func:`attach_exits`: its ``exits_at`` names when
    given (``stages`` is then not read), else ``placement`` among its block outputs.
    """
    if isinstance(backbone, GraphBackbone):
        if mitigation:
            raise EENetError(f"mitigation '{mitigation}' applies to staged backbones (it reads "
                             "the backbone's own classifier head); give mitigation=null")
        if input_size is None:
            raise EENetError("a graph backbone needs the input size (C, H, W)")
        at = backbone.exits_at
        return attach_exits(backbone.model, at=at, exit=exit_block,
                            num_classes=backbone.num_classes, input_size=input_size,
                            placement=placement, num_exits=num_exits,
                            stages=None if at else stages, tokens=backbone.tokens)
    input_size = tuple(input_size or backbone.default_input_size)
    if input_size[0] != backbone.in_chans:
        raise EENetError(f"the input has {input_size[0]} channel(s) but the backbone expects "
                         f"{backbone.in_chans}; set dataset.in_chans (or backbone.in_chans) to match")
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
