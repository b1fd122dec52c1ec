"""Exits on any torch model, through a rewritten graph: static path only.

For real early exit on any traceable model use :mod:`eenet.models.graph_split`
(``eenet.attach_exits``), which cuts the graph into segments that carry their
live values. This module stays as the static-only form and as an oracle in tests. torchvision's
``create_feature_extractor`` (torch.fx) rewrites the model's graph so that one
call returns the model's output and the inner nodes the user names (names as
listed by ``torchvision.models.feature_extraction.get_graph_node_names``; a
module's name stands for the last node inside it, e.g. ``layer2``). An exit
block (:class:`eenet.models.ExitBlock`) reads each named node, and
:class:`GraphExitNetwork` returns the same :class:`ExitOutputs` as
:meth:`EarlyExitNetwork.forward`: every exit's logits and confidence logits in
order, the model's own output as the final exit, its confidence logit +inf
(h_N = 1). On a staged backbone, with the nodes at the stages' outputs, the two
networks give the same outputs (a test checks it).

A rewritten graph always computes every requested output: the whole model runs
for every sample, whatever the exits decide. Real early exit (the dynamic
engine, ``eenet.inference``, which stops per sample and saves compute) needs an
explicit list of stages that can stop part-way (a
:class:`eenet.models.StagedBackbone`) or a cut graph
(:class:`eenet.models.graph_split.GraphSplitNetwork`);
:meth:`GraphExitNetwork.walk` raises :class:`EENetError` to say so. Use this network for static-path training,
metrics and calibration only.

Two details of the rewritten graph: each requested node's value is cloned as
soon as it is computed, because a later in-place operation of the model (a
``ReLU(inplace=True)`` after a residual addition, DenseNet's final
``F.relu(..., inplace=True)``) would otherwise change what the exit reads; and
the model must be traceable by torch.fx (no control flow that depends on the
data) and return one ``(batch, classes)`` tensor.

Entry points: :func:`attach_points` (check node names, measure their shapes),
:class:`GraphExitNetwork` (given exits or an exit factory) and
:func:`build_graph_exit_network`. Exit placement by MACs (``eenet.build``) and
cost tables (``eenet.cost``) read a staged backbone, so they do not apply here;
pass cost fractions of your own.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import (create_feature_extractor,
                                                   get_graph_node_names)

from eenet.errors import EENetError
from eenet.models.early_exit import ExitOutputs, check_input_shape

OUTPUT_KEY = "output"


@dataclass(frozen=True)
class AttachPoint:
    """A graph node an exit reads.

    Attributes:
        node: the node name as given (a node, or a module standing for its last node).
        index: position of that node in the model's graph (execution order).
        shape: the node's output shape for one sample, e.g. ``(C, H, W)``.
    """

    node: str
    index: int
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> tuple[int, ...]:
        return self.shape[1:]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def graph_node_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """The model's node names in execution order, traced in train and in eval mode."""
    try:
        return get_graph_node_names(model, suppress_diff_warning=True)
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        raise EENetError(f"torch.fx cannot trace {type(model).__name__} ({_first_line(exc)}); "
                         "give this model an explicit stage list (a StagedBackbone) instead"
                         ) from exc


def _node_index(query: str, names: Sequence[str]) -> int | None:
    """Index of the node ``query`` names: itself, or the last node inside a module of that name."""
    hits = [i for i, n in enumerate(names) if n == query or n.startswith(query + ".")]
    return hits[-1] if hits else None


def _resolve(model: nn.Module, node_names: Sequence[str], output_node: str | None
             ) -> tuple[list[int], str]:
    """Check the requested nodes against both graphs; their eval-graph indices, the output node."""
    train_names, eval_names = graph_node_names(model)
    out = output_node or eval_names[-1]
    indices = []
    for query in [*node_names, out]:
        idx = _node_index(query, eval_names)
        if idx is None or _node_index(query, train_names) is None:
            close = difflib.get_close_matches(query, eval_names, n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise EENetError(f"node '{query}' is not in the graph of {type(model).__name__} "
                             f"(in both train and eval mode){hint}; list the nodes with "
                             "torchvision.models.feature_extraction.get_graph_node_names(model)")
        indices.append(idx)
    *indices, out_index = indices
    if len(set(node_names)) != len(node_names) or sorted(indices) != indices \
            or len(set(indices)) != len(indices):
        raise EENetError("exit nodes must be distinct and in execution order, "
                         f"got {list(node_names)}")
    if indices and indices[-1] >= out_index:
        raise EENetError(f"exit node '{node_names[-1]}' is not before the model's output node "
                         f"'{out}'; early exits read nodes that come before it")
    return indices, out


def _probe_input(input_size: Sequence[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, *input_size, generator=g)


@torch.no_grad()
def _eval_run(module: nn.Module, x: torch.Tensor, device_of: nn.Module):
    was_training = module.training
    module.eval()
    try:
        param = next(device_of.parameters(), None)
        return module(x.to(param.device) if param is not None else x)
    finally:
        module.train(was_training)


def _points(node_names: Sequence[str], indices: Sequence[int], feats: dict) -> list[AttachPoint]:
    return [AttachPoint(node=n, index=i, shape=tuple(feats[f"exit{k}"].shape[1:]))
            for k, (n, i) in enumerate(zip(node_names, indices))]


def attach_points(model: nn.Module, node_names: Sequence[str],
                  input_size: Sequence[int]) -> list[AttachPoint]:
    """Validate the nodes exits should read and measure their output shapes.

    Args:
        model: any torch.fx-traceable model.
        node_names: graph nodes (or module names) in execution order, all before
            the model's output.
        input_size: one input's shape ``(C, H, W)`` for the shape probe.
    """
    indices, _ = _resolve(model, node_names, None)
    if not node_names:
        return []
    # only the requested nodes are returned: the graph ends at the last of them
    extractor = create_feature_extractor(model, {n: f"exit{k}" for k, n in enumerate(node_names)},
                                         suppress_diff_warning=True)
    return _points(node_names, indices, _eval_run(extractor, _probe_input(input_size), model))


def _clone_returned_nodes(graph: torch.fx.Graph) -> None:
    """Return a clone of every exit node, taken right after it is computed (see module doc)."""
    output = next(n for n in graph.nodes if n.op == "output")
    returned = dict(output.args[0])
    for key, node in returned.items():
        if key != OUTPUT_KEY:
            with graph.inserting_after(node):
                returned[key] = graph.call_method("clone", (node,))
    output.args = (returned,)


class GraphExitNetwork(nn.Module):
    """Any traceable model plus exits on named graph nodes; static path only (see module doc).

    Give either ``exits`` (built modules) or ``exit_block`` (a factory called
    once per node with the shapes measured on the rewritten graph).

    Args:
        model: the model; it returns one ``(B, K)`` tensor of logits. Its modules
            are shared, not copied.
        node_names: the graph nodes (or module names) the exits read, in execution order.
        input_size: expected input ``(C, H, W)``; the channel count is always
            checked, the spatial size when ``fixed_size`` is true.
        exits: one exit per node, mapping its output to ``(logits, confidence logits)``.
        exit_block: called as ``exit_block(in_channels=..., num_classes=..., in_size=(H, W))``
            for every node, which must give a ``(B, C, H, W)`` feature map (e.g. a
            partial of :class:`eenet.models.ExitBlock`).
        output_node: the node holding the model's output (default: the graph's last node).
        fixed_size: whether the network only accepts ``input_size`` (default:
            whether an exit flattens a feature map, ``preblock="plain"``).
    """

    def __init__(self, model: nn.Module, node_names: Sequence[str], input_size: Sequence[int],
                 exits: Sequence[nn.Module] | None = None,
                 exit_block: Callable[..., nn.Module] | None = None,
                 output_node: str | None = None, fixed_size: bool | None = None):
        super().__init__()
        node_names = list(node_names)
        if (exits is None) == (exit_block is None):
            raise EENetError("give either exits (modules) or exit_block (a factory), not both")
        if exits is not None and len(exits) != len(node_names):
            raise EENetError(f"one exit per node: {len(exits)} exits for {len(node_names)} nodes")
        indices, out = _resolve(model, node_names, output_node)
        self.exit_nodes = node_names
        self.output_node = out
        self.input_size = tuple(int(v) for v in input_size)
        return_nodes = {n: f"exit{k}" for k, n in enumerate(node_names)}
        return_nodes[out] = OUTPUT_KEY
        extractor = create_feature_extractor(model, return_nodes, suppress_diff_warning=True)
        for graph in (extractor.train_graph, extractor.eval_graph):
            _clone_returned_nodes(graph)
        extractor.recompile()
        self.extractor = extractor

        x = _probe_input(self.input_size)
        expected = _eval_run(model, x, model)
        feats = _eval_run(extractor, x, model)
        if not (isinstance(expected, torch.Tensor) and expected.dim() == 2):
            shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else ""
            raise EENetError("the model must return one (batch, classes) tensor, got "
                             f"{type(expected).__name__}{shape}")
        got = feats[OUTPUT_KEY]
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise EENetError(f"node '{out}' does not hold the model's output; pass output_node= "
                             "the node the model returns")
        self.num_classes = int(expected.shape[1])
        self.points = _points(node_names, indices, feats)
        if exits is None:
            for p in self.points:
                if len(p.shape) != 3:
                    raise EENetError(f"node '{p.node}' gives shape (batch, "
                                     f"{', '.join(map(str, p.shape))}); exit blocks read "
                                     "(batch, C, H, W) feature maps")
            exits = [exit_block(in_channels=p.channels, num_classes=self.num_classes,
                                in_size=tuple(p.size)) for p in self.points]
        self.exits = nn.ModuleList(exits)
        if fixed_size is None:
            fixed_size = any(getattr(e, "preblock", "pool") == "plain" for e in self.exits)
        self.fixed_size = bool(fixed_size)
        self.train(model.training)  # the exits and the graph follow the model's mode

    @property
    def num_exits(self) -> int:
        """All exits, the final one included (N+1)."""
        return len(self.exits) + 1

    def exit_names(self) -> list[str]:
        return [f"exit{i}" for i in range(self.num_exits)]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an error naming the expected shape when ``x`` does not fit."""
        check_input_shape(x, self.input_size, self.fixed_size)

    def segments(self):
        """Not available: the dynamic path needs segments that can stop (see module doc)."""
        raise EENetError("a GraphExitNetwork cannot run dynamic (per-sample) early exit: its "
                         "rewritten graph always computes every requested output; use "
                         "eenet.attach_exits (the graph cut into segments) or a StagedBackbone "
                         "for the dynamic engine, and this network for static-path training, "
                         "metrics and calibration only")

    def walk(self):
        """Not available, as :meth:`segments`."""
        self.segments()

    def forward(self, x: torch.Tensor) -> ExitOutputs:
        """Static path: the whole model and every exit; returns all exits' outputs."""
        self.check_input(x)
        feats = self.extractor(x)
        logits, conf = [], []
        for k, exit_block in enumerate(self.exits):
            out = exit_block(feats[f"exit{k}"])
            logits.append(out[0])
            conf.append(out[1])
        final = feats[OUTPUT_KEY]
        logits.append(final)
        conf.append(torch.full(final.shape[:1], math.inf, dtype=final.dtype, device=final.device))
        return ExitOutputs(logits, conf)


def build_graph_exit_network(model: nn.Module, node_names: Sequence[str],
                             exit_block: Callable[..., nn.Module], input_size: Sequence[int],
                             output_node: str | None = None) -> GraphExitNetwork:
    """Attach one ``exit_block`` to each named node of ``model`` (the graph counterpart of
    :func:`eenet.build.build_early_exit_network` with explicit placement)."""
    return GraphExitNetwork(model, node_names, input_size, exit_block=exit_block,
                            output_node=output_node)
