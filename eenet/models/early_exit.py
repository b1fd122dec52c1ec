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
pre-block features, which both paths carry along with the samples that go on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from eenet.errors import EENetError
from eenet.models.placement import check_explicit
from eenet.models.staged import StagedBackbone


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
        c, h, w = self.input_size
        expected = f"(batch, {c}, {h}, {w})" if self.fixed_size else f"(batch, {c}, H, W)"
        if x.dim() != 4 or x.shape[1] != c or (self.fixed_size and tuple(x.shape[2:]) != (h, w)):
            raise EENetError(f"input of shape {tuple(x.shape)} does not fit this network: "
                             f"expected {expected}")

    def run_exit(self, j: int, exit_block: nn.Module, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Early exit ``j`` on stage output ``x``: ``(logits, confidence logits, carried)``.

        ``carried`` is the exit's pre-block features when it is the ``carry_exit``, else None.
        """
        if j == self.carry_exit:
            f = exit_block.pre(x)
            logits, z = exit_block.predict(f)
            return logits, z, f
        logits, z = exit_block(x)
        return logits, z, None

    def final_exit(self, x: torch.Tensor, carried: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final exit on the last stage's output: the backbone's head, h_N = 1."""
        head = self.backbone.head
        logits = head.fc(head.pool(x))
        if self.final_head is not None:
            logits = logits + self.final_head(x, carried)
        return logits, torch.full(logits.shape[:1], float("inf"), dtype=logits.dtype,
                                  device=logits.device)

    def segments(self) -> list[tuple[list[nn.Module], nn.Module | None]]:
        """The network as ``[(stages to run, exit after them), ...]``, stem first.

        The first segment's modules start with the stem; the last segment's exit
        is ``None`` (the final exit, :meth:`final_exit`). Both the static and the
        dynamic path run exactly these modules in this order.
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

    def run_segment(self, j: int, segment: tuple[list[nn.Module], nn.Module | None],
                    x: torch.Tensor, carried: torch.Tensor | None = None, head: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                               torch.Tensor | None]:
        """Segment ``j`` of :meth:`segments`: its stages, then its exit (the final one if None).

        Returns ``(stage output, logits, confidence logits, carried)``; ``carried`` is
        the features the final exit takes from the ``carry_exit`` (T-RecX mitigation).
        With ``head=False`` an early exit's head is not run (logits and confidence
        are None); the ``carry_exit`` cannot be skipped. The static path, the dynamic
        engine and the latency table all step through the network with this method.
        """
        modules, exit_block = segment
        for m in modules:
            x = m(x)
        if not head and exit_block is not None:
            if j == self.carry_exit:
                raise EENetError(f"exit {j}'s head cannot be skipped: the final exit reads "
                                 "its features")
            return x, None, None, carried
        if exit_block is None:
            logits, conf = self.final_exit(x, carried)
        else:
            logits, conf, c = self.run_exit(j, exit_block, x)
            carried = c if c is not None else carried
        return x, logits, conf, carried

    def forward(self, x: torch.Tensor) -> ExitOutputs:
        """Static path: every stage and every exit; returns all exits' outputs."""
        self.check_input(x)
        logits, conf = [], []
        carried = None
        for j, segment in enumerate(self.segments()):
            x, lg, cf, carried = self.run_segment(j, segment, x, carried)
            logits.append(lg)
            conf.append(cf)
        return ExitOutputs(logits, conf)


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
