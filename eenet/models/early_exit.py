"""The early-exit network: a staged backbone with exit blocks after chosen stages.

The static path, :meth:`EarlyExitNetwork.forward`, runs every stage and every
exit and returns all exits' outputs; it is what training, metrics, calibration
and cost tracing use. The dynamic path (``eenet.inference``) walks the same
modules in the same order through :meth:`segments` and stops per sample.

Exits are numbered 0..N: 0..N-1 are the early exits in stage order and N is the
final exit, which is the backbone's own classifier. Its confidence is h_N = 1:
EENets' recursion (Demir & Akbas, eq. for P_i, C_i) ends with P_N = p_N, so a
sample that reaches the final exit always leaves there.

Optionally the final exit is helped by an early exit (T-RecX's overthinking
mitigation, ``eenet.models.trecx``): a ``final_head`` adds logits computed from
the last stage's output and, when ``carry_exit`` is set, from that early exit's
pre-block features.

Every walker (static path, dynamic engine, latency and cost tables) runs the
network as a list of :class:`Step` s over *live values*: a tuple of batch
tensors, ``(x,)`` at the input. A staged backbone has one live value, the
stage output; the ``carry_exit``'s features become a second one once that exit
has run. A network cut from any traced graph
(:class:`eenet.models.graph_split.GraphSplitNetwork`) carries every tensor a
later segment reads, skip connections included, through the same interface.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from eenet.errors import EENetError
from eenet.models.placement import check_explicit
from eenet.models.staged import StagedBackbone



def check_input_shape(x: torch.Tensor, input_size, fixed_size: bool) -> None:
    """Raise an error naming the expected shape when ``x`` is not a batch of ``input_size``
    (``(C, H, W)``; with ``fixed_size`` False only the channel count must match)."""
    c, *rest = input_size
    if x.dim() != 1 + len(input_size) or x.shape[1] != c or (
            fixed_size and tuple(x.shape[2:]) != tuple(rest)):
        # the message is built only here: the check runs on every engine call
        expected = (f"(batch, {c}, {', '.join(map(str, rest))})" if fixed_size else
                    f"(batch, {c}, {', '.join('HW'[:len(rest)]) if len(rest) <= 2 else '...'})")
        raise EENetError(f"input of shape {tuple(x.shape)} does not fit this network: "
                         f"expected {expected}")

class ExitOutputs(NamedTuple):
    """Outputs of every exit for a batch.

    Attributes:
        logits: N+1 tensors of shape (B, K), exits in order, the final exit last.
        conf_logits: N+1 tensors of shape (B,); h_i = sigmoid(conf_logits[i]).
            The final exit's entry is +inf (h_N = 1).
    """

    logits: list[torch.Tensor]
    conf_logits: list[torch.Tensor]

    @property
    def confidences(self) -> list[torch.Tensor]:
        return [torch.sigmoid(z) for z in self.conf_logits]


class Step(NamedTuple):
    """One segment of a network and the exit after it.

    Attributes:
        body: ``live -> live``: the segment on the live values (a tuple of tensors whose
            first axis is the batch; the network's input is ``(x,)``).
        head: ``live -> (logits (B, K), confidence logits (B,), live)``: the exit after
            the segment (the final exit for the last step, confidence +inf); it may add
            a live value that a later exit reads.
        skippable: whether the head may be left out when its exit releases no sample
            (false when a later exit reads what it adds, and for the final exit).
        fused: optional ``live -> (logits, confidence logits, live)``, the body followed by
            the head in one call (what ``head(body(live))`` gives), which a backend may
            provide because one call costs less than two at small batch sizes
            (:mod:`eenet.inference.backends`); the engine uses it when the head runs.
    """

    body: Callable[[tuple], tuple]
    head: Callable[[tuple], tuple]
    skippable: bool
    fused: Callable[[tuple], tuple] | None = None


def static_walk(steps: Sequence[Step], x: torch.Tensor) -> ExitOutputs:
    """Every step and every exit on ``x``: the static path of any network with a walk."""
    live: tuple = (x,)
    logits, conf = [], []
    for step in steps:
        live = step.body(live)
        lg, z, live = step.head(live)
        logits.append(lg)
        conf.append(z)
    return ExitOutputs(logits, conf)


class EarlyExitNetwork(nn.Module):
    """Backbone plus early exits.

    Args:
        backbone: a :class:`StagedBackbone`.
        exits: one exit module per entry of ``exit_stages``; each maps a stage
            output to ``(logits, confidence logits)``.
        exit_stages: stage index after which each exit attaches, increasing.
        input_size: expected input ``(C, H, W)``; the channel count is always
            checked, the spatial size when ``fixed_size`` is true.
        fixed_size: whether the network only accepts ``input_size`` (true when
            an exit flattens a feature map).
        final_head: optional module ``(last stage output, carried) -> logits`` added to
            the backbone classifier's logits at the final exit.
        carry_exit: index of the early exit whose pre-block features ``final_head`` reads.
    """

    def __init__(self, backbone: StagedBackbone, exits: list[nn.Module], exit_stages: list[int],
                 input_size: tuple[int, int, int], fixed_size: bool = False,
                 final_head: nn.Module | None = None, carry_exit: int | None = None):
        super().__init__()
        if len(exits) != len(exit_stages):
            raise ValueError("one exit per exit stage")
        self.backbone = backbone
        self.exits = nn.ModuleList(exits)
        self.exit_stages = check_explicit(exit_stages, backbone.num_stages)
        self.input_size = tuple(int(v) for v in input_size)
        self.fixed_size = fixed_size
        self._exit_after = {s: j for j, s in enumerate(self.exit_stages)}
        self.final_head = final_head
        if carry_exit is not None and not 0 <= carry_exit < len(exits):
            raise EENetError(f"carry_exit {carry_exit} is not an early exit (0..{len(exits) - 1})")
        self.carry_exit = carry_exit

    @property
    def num_exits(self) -> int:
        """All exits, the final one included (N+1)."""
        return len(self.exits) + 1

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def exit_names(self) -> list[str]:
        return [f"exit{i}" for i in range(self.num_exits)]

    def exit_stage_indices(self) -> list[int]:
        """Stage after which each exit reads, the final exit's being the last stage."""
        return [*self.exit_stages, self.backbone.num_stages - 1]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an error naming the expected shape when ``x`` does not fit."""
        check_input_shape(x, self.input_size, self.fixed_size)

    def final_exit(self, x: torch.Tensor, carried: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final exit on the last stage's output: the backbone's head, h_N = 1.

        ``carried`` is the ``carry_exit``'s pre-block features (T-RecX ``concat`` mitigation).
        """
        head = self.backbone.head
        logits = head.fc(head.pool(x))
        if self.final_head is not None:
            logits = logits + self.final_head(x, carried)
        return logits, torch.full(logits.shape[:1], float("inf"), dtype=logits.dtype,
                                  device=logits.device)

    def segments(self) -> list[tuple[list[nn.Module], nn.Module | None]]:
        """The network as ``[(stages to run, exit after them), ...]``, stem first.

        The first segment's modules start with the stem; the last segment's exit
        is ``None`` (the final exit, :meth:`final_exit`). :meth:`walk` runs exactly
        these modules in this order.
        """
        segs: list[tuple[list[nn.Module], nn.Module | None]] = []
        run: list[nn.Module] = [self.backbone.stem]
        for k, stage in enumerate(self.backbone.stages):
            run.append(stage)
            if k in self._exit_after:
                segs.append((run, self.exits[self._exit_after[k]]))
                run = []
        segs.append((run, None))
        return segs

    def walk(self) -> list[Step]:
        """The segments as :class:`Step` s: what the static path, the dynamic engine, the
        latency and the cost tables all run.

        The live values are the stage output, plus, once the ``carry_exit`` has run,
        its pre-block features, which the final exit reads (T-RecX ``concat``
        mitigation): one more live value, kept for the samples that go on.
        """
        steps = []
        for j, (modules, exit_block) in enumerate(self.segments()):
            body = _stages(modules)
            if exit_block is None:
                head = self._final_step
            elif j == self.carry_exit:
                head = _carrying_exit(exit_block)
            else:
                head = _exit(exit_block)
            steps.append(Step(body, head, j != self.carry_exit))
        return steps

    def _final_step(self, live: tuple) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        logits, conf = self.final_exit(live[0], live[1] if len(live) > 1 else None)
        return logits, conf, live

    def forward(self, x: torch.Tensor) -> ExitOutputs:
        """Static path: every stage and every exit; returns all exits' outputs."""
        self.check_input(x)
        return static_walk(self.walk(), x)


def _stages(modules: list[nn.Module]) -> Callable[[tuple], tuple]:
    def body(live: tuple) -> tuple:
        x = live[0]
        for m in modules:
            x = m(x)
        return (x,) if len(live) == 1 else (x, *live[1:])
    return body


def _exit(exit_block: nn.Module) -> Callable[[tuple], tuple]:
    def head(live: tuple) -> tuple:
        logits, z = exit_block(live[0])
        return logits, z, live
    return head


def _carrying_exit(exit_block: nn.Module) -> Callable[[tuple], tuple]:
    def head(live: tuple) -> tuple:
        f = exit_block.pre(live[0])
        logits, z = exit_block.predict(f)
        return logits, z, (live[0], f)
    return head


def load_state_dict_checked(module: nn.Module, state_dict: dict, what: str = "checkpoint") -> None:
    """Load a state dict strictly; a mismatch raises an error naming the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict)
                    if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", shapes)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise EENetError(f"{what} does not match the configured model; " + "; ".join(parts))
    module.load_state_dict(state_dict)
