"""Per-exit computational cost from fvcore, counted on the real modules.

Convention: fvcore counts one fused multiply-add as one flop, so every number
here is in MACs (multiply-accumulates). It counts convolutions, linear layers,
BatchNorm (2 per element with affine parameters, in eval mode) and adaptive
average pooling; element-wise operations (ReLU, residual additions) are free.

For exit i of an early-exit network (Demir & Akbas, EENets, section 3.2):

    macs_i          = MACs(stem) + MACs(stages 0..s_i) + sum_{j<=i} MACs(exit head j)
    cost_fraction_i = macs_i / MACs(plain backbone: stem, all stages, head)

A sample that reaches exit i has paid for every exit head before it, so the
final exit's fraction is above 1: the exit heads' overhead is counted, not
hidden. Heads that are not run are not paid for: an exit whose threshold never
releases a sample (``inf``) need not compute its head at all, and
:meth:`CostTable.fractions_skipping` gives the costs with those heads left out
(what the dynamic engine and the calibrator use). Costs are traced step by
step on ``net.walk()``, the segments and heads the static path and the dynamic
engine run, each on the live values it receives, for a staged backbone and for
a model cut from a traced graph alike (``eenet.models.graph_split``: its
segments add up to fvcore's count of the unsplit model, the base there); a dynamic run's real cost can be checked
with ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from eenet.models.early_exit import EarlyExitNetwork, Step
from eenet.models.staged import StagedBackbone

MAC_CONVENTION = "MACs as counted by fvcore (one fused multiply-add = one flop)"


def _fvcore(model: nn.Module, inputs: tuple) -> dict[str, int]:
    with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        logging.getLogger("fvcore").setLevel(logging.ERROR)
        fa = FlopCountAnalysis(model, inputs)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.tracer_warnings("none")
        return {k: int(v) for k, v in fa.by_module().items()}


def macs_by_module(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """fvcore MACs of ``model`` for one input of ``input_size``, per module name (eval mode)."""
    with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, *input_size, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            fa = FlopCountAnalysis(model, (x,))
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            fa.tracer_warnings("none")
            counts = dict(fa.by_module())
    finally:
        model.train(was_training)
    return {k: int(v) for k, v in counts.items()}


@dataclass
class BackboneCost:
    """MACs of a plain backbone's parts."""

    stem: int
    stages: list[int]
    head: int

    @property
    def total(self) -> int:
        return self.stem + sum(self.stages) + self.head

    @property
    def cumulative(self) -> list[int]:
        """MACs of stem plus stages 0..k, for every stage k."""
        out, acc = [], self.stem
        for m in self.stages:
            acc += m
            out.append(acc)
        return out


def backbone_cost(backbone: StagedBackbone, input_size: tuple[int, ...]) -> BackboneCost:
    """Trace the plain backbone (no exits) and split its MACs by stem, stage and head."""
    m = macs_by_module(backbone, input_size)
    stages = [m.get(f"stages.{i}", 0) for i in range(backbone.num_stages)]
    cost = BackboneCost(stem=m.get("stem", 0), stages=stages, head=m.get("head", 0))
    if cost.total != m[""]:
        raise RuntimeError(f"backbone MACs outside stem/stages/head: {m[''] - cost.total}; "
                           "a backbone must compute everything inside those modules")
    return cost


@dataclass
class ExitCost:
    name: str
    stage: int
    head_macs: int
    macs: int
    cost_fraction: float


@dataclass
class CostTable:
    """Per-exit cost of an early-exit network (see module docstring)."""

    backbone_macs: int
    input_size: tuple[int, ...]
    exits: list[ExitCost] = field(default_factory=list)
    convention: str = MAC_CONVENTION
    #: early exits whose head runs even when it releases no sample: T-RecX's
    #: mitigation carries that exit's features to the final classifier
    always_run: list[int] = field(default_factory=list)

    @property
    def fractions(self) -> list[float]:
        """c_0..c_N with every early exit's head paid for."""
        return [e.cost_fraction for e in self.exits]

    @property
    def head_fractions(self) -> list[float]:
        """Each early exit's head as a fraction of the plain backbone (N values)."""
        return [e.head_macs / self.backbone_macs for e in self.exits[:-1]]

    def skippable(self) -> list[bool]:
        """Which early exits' heads can be left out when they release no sample."""
        return [j not in self.always_run for j in range(len(self.exits) - 1)]

    def fractions_skipping(self, skipped: Sequence[bool]) -> list[float]:
        """c_0..c_N when the heads of the early exits marked in ``skipped`` are not run.

        A skipped exit releases no sample, so only the exits it does not skip are
        reached through it; c_i drops by the heads skipped at or before exit i.
        """
        skipped = list(skipped)
        if len(skipped) != len(self.exits) - 1:
            raise ValueError(f"{len(skipped)} flags for {len(self.exits) - 1} early exits")
        for j, s in enumerate(skipped):
            if s and j in self.always_run:
                raise ValueError(f"exit {j}'s head always runs (its features feed the final exit)")
        out, saved = [], 0
        for j, e in enumerate(self.exits):
            if j < len(skipped) and skipped[j]:
                saved += e.head_macs
            out.append((e.macs - saved) / self.backbone_macs)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        return cls(backbone_macs=int(d["backbone_macs"]), input_size=tuple(d["input_size"]),
                   exits=[ExitCost(**e) for e in d["exits"]],
                   convention=d.get("convention", MAC_CONVENTION),
                   always_run=[int(j) for j in d.get("always_run", [])])

    def to_markdown(self) -> str:
        lines = [f"Backbone: {self.backbone_macs / 1e6:.3f} M MACs for input {tuple(self.input_size)} "
                 f"({self.convention}).", "",
                 "| exit | after stage | head MACs | MACs to exit | cost fraction |",
                 "|---|---|---|---|---|"]
        for e in self.exits:
            lines.append(f"| {e.name} | {e.stage} | {e.head_macs:,} | {e.macs:,} | {e.cost_fraction:.4f} |")
        return "\n".join(lines)


def exit_cost_table(net: nn.Module, input_size: tuple[int, ...] | None = None) -> CostTable:
    """Per-exit MACs of ``net``: fvcore's count of every step of ``net.walk()`` (the segments
    and exit heads the static path and the dynamic engine run), on the live values it receives.

    The base is the plain backbone: stem, stages and head of a staged backbone, or
    the unsplit model of a network cut from a traced graph, whose segments must add
    up to it exactly. The walk's total must equal fvcore's count of the static path.
    """
    input_size = tuple(input_size or net.input_size)
    steps = net.walk()
    bodies, heads = walk_macs(net, steps, input_size)
    if isinstance(net, EarlyExitNetwork):
        base = backbone_cost(net.backbone, input_size).total
        stages = net.exit_stage_indices()
    else:  # a cut graph: the final exit is the model's own classifier, in the last segment
        base = macs_by_module(net.backbone, input_size)[""]
        stages = net.exit_stage_indices()
        if sum(bodies) + heads[-1] != base:
            raise RuntimeError(f"the segments' MACs {sum(bodies)} (final head {heads[-1]}) "
                               f"differ from the unsplit model's {base}")
    rows, acc = [], 0
    for i, (stage, body, head) in enumerate(zip(stages, bodies, heads)):
        acc += body + head
        rows.append(ExitCost(name=f"exit{i}", stage=stage, head_macs=head, macs=acc,
                             cost_fraction=acc / base))
    static = macs_by_module(net, input_size)[""]
    if rows[-1].macs != static:
        raise RuntimeError(f"static path MACs {static} differ from the final exit's {rows[-1].macs}")
    always = [j for j, step in enumerate(steps[:-1]) if not step.skippable]
    return CostTable(backbone_macs=base, input_size=input_size, exits=rows, always_run=always)

class _Call(nn.Module):
    """A step's body or head as a module, so that fvcore can trace it with the live values."""

    def __init__(self, fn, modules: nn.Module):
        super().__init__()
        self.fn = fn
        self.net = modules  # registered so that fvcore sees the modules it calls

    def forward(self, *live):
        return self.fn(tuple(live))


def walk_macs(net: nn.Module, steps: Sequence[Step], input_size: tuple[int, ...]
              ) -> tuple[list[int], list[int]]:
    """fvcore MACs of every step's body and head, on the live values of one input (eval mode).

    The same steps the static path and the dynamic engine run (``net.walk()``), each
    counted on exactly the live values it receives.
    """
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        live: tuple = (torch.zeros(1, *input_size, device=device),)
        bodies, heads = [], []
        # counted with autograd on, as macs_by_module counts the static path: without it
        # nn.MultiheadAttention takes a fused kernel that fvcore does not count
        for step in steps:
            bodies.append(_fvcore(_Call(step.body, net), live)[""])
            with torch.no_grad():
                live = step.body(live)
            heads.append(_fvcore(_Call(step.head, net), live)[""])
            with torch.no_grad():
                _, _, live = step.head(live)
    finally:
        net.train(was_training)
    return bodies, heads

