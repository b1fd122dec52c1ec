"""T-RecX: the early-exit block for tiny CNNs and the final exit helped by it against overthinking.

Ghanathe & Wilton, "T-RecX: Tiny-Resource Efficient Convolutional neural
networks with early-eXit", ACM Computing Frontiers 2023.

Early exit (:class:`TRecXExit`): a 1x1 convolution, a 3x3 depthwise
convolution with stride 2 and ReLU, global average pooling and a dense
classifier. It is cheap in MACs and parameters, as a milliwatt device needs;
T-RecX exits when the largest softmax probability passes a threshold, so the
confidence head defaults to eenet's ``stats`` head (which starts as exactly
that probability, see ``eenet.models.exits``).

Overthinking mitigation (:class:`MitigatedFinalHead`): the final classifier
also sees what the early exit learned, so that samples the early exit gets
right are not lost at the end ("overthinking", Kaya et al., ICML 2019). Two
forms, both adding a linear map to the backbone's own classifier, which is the
same as one dense layer on the concatenated features:

- ``trecx`` (the paper's form): the early exit's depthwise filters are applied,
  with the same (tied) weights, to the final feature maps; the result, after
  ReLU and pooling, is concatenated with the pooled final features before the
  dense layer. Nothing from the early exit's run is carried to the end, so the
  dynamic path and the exported model need no extra state. Requires the early
  exit's width to equal the final stage's channels.
- ``concat`` (a plain alternative): the early exit's pooled features are
  concatenated with the pooled final features before the dense layer; the
  early exit's features are carried along with the samples that go on.
"""

from __future__ import annotations

import torch
from torch import nn

from eenet.errors import EENetError
from eenet.models.exits import ExitHeads
from eenet.models.staged import ClassifierHead

MITIGATIONS = ("trecx", "concat")


class TRecXExit(ExitHeads):
    """1x1 conv -> depthwise 3x3 stride 2 + ReLU -> global average pool -> dense.

    Args:
        in_channels: channels of the stage output.
        num_classes: classifier outputs.
        in_size: spatial size of the stage output (unused; kept for the exit-factory contract).
        width: output channels of the 1x1 convolution (default: ``in_channels``);
            for the ``trecx`` mitigation it must equal the final stage's channels.
        confidence_input: ``stats`` (default; starts as the max softmax probability)
            or ``features``.
    """

    def __init__(self, in_channels: int, num_classes: int, in_size: tuple[int, int] = (1, 1),
                 width: int | None = None, confidence_input: str = "stats"):
        super().__init__()
        width = width or in_channels
        self.pointwise = nn.Conv2d(in_channels, width, 1)
        self.depthwise = nn.Conv2d(width, width, 3, 2, 1, groups=width)
        self.pre = nn.Sequential(self.pointwise, self.depthwise, nn.ReLU(inplace=True),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self._build_heads(width, num_classes, confidence_input)
        self.preblock = "trecx"


class MitigatedFinalHead(nn.Module):
    """The extra logits the final exit gets from the early exit (see module docstring).

    ``forward(x, carried)`` returns a (B, K) term added to the backbone
    classifier's logits; ``x`` is the last stage's output, ``carried`` the
    early exit's pooled features (``concat`` only).
    """

    def __init__(self, mode: str, head: ClassifierHead, exit_block: nn.Module, final_channels: int,
                 num_classes: int):
        super().__init__()
        if mode not in MITIGATIONS:
            raise EENetError(f"unknown mitigation '{mode}'; accepted: {', '.join(MITIGATIONS)}")
        self.mode = mode
        if mode == "trecx":
            dw = getattr(exit_block, "depthwise", None)
            if dw is None:
                raise EENetError("mitigation 'trecx' reuses the early exit's depthwise "
                                 "convolution: use the T-RecX exit (exit=trecx)")
            if dw.in_channels != final_channels:
                raise EENetError(f"mitigation 'trecx' applies the early exit's depthwise filters "
                                 f"({dw.in_channels} channels) to the final feature maps "
                                 f"({final_channels} channels): set exit.width={final_channels}")
            self.tied = [dw]  # a plain list: the weights stay registered under the exit only
            self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            extra = final_channels
        else:
            extra = exit_block.num_features
        self.fc = nn.Linear(extra, num_classes, bias=False)
        nn.init.zeros_(self.fc.weight)  # starts as the backbone's own classifier

    @property
    def needs_carry(self) -> bool:
        return self.mode == "concat"

    def forward(self, x: torch.Tensor, carried: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "trecx":
            dw = self.tied[0]
            z = nn.functional.conv2d(x, dw.weight, dw.bias, dw.stride, dw.padding, dw.dilation,
                                     dw.groups)
            return self.fc(self.pool(z))
        if carried is None:
            raise EENetError("mitigation 'concat' needs the early exit's features")
        return self.fc(carried)
