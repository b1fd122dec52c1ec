"""T-RecX: the early-exit block for tiny CNNs and the final exit helped by it against overthinking.

Ghanathe & Wilton, "T-RecX: Tiny-Resource Efficient Convolutional neural
networks with early-eXit", ACM Computing Frontiers 2023.

Early exit (:class:`TRecXExit`), as the paper builds it on the three MLPerf Tiny
models: an optional 1x1 convolution that sets the exit's width, a depthwise
convolution with stride 2 and ReLU (no BatchNorm), average pooling and one
dense classifier. Per model (the ``trecx_*`` experiment configs):

- ResNet-8 (after the first residual stack, 16x32x32): 1x1 conv to 32 channels,
  2x2 depthwise conv with stride 2, 4x4 average pooling (a 4x4 grid of 32
  channels, flattened: 512 features), dense.
- DS-CNN: no 1x1 conv; a 3x3 depthwise conv with stride 2 on the first 32 of
  the 64 channels, 2x2 average pooling (a 6x1 grid: 192 features), dense.
- MobileNetV1 0.25 (after the third depthwise-separable block, 32x24x24): 1x1
  conv to 64 channels, 2x2 depthwise conv with stride 2, 4x4 average pooling
  (3x3 grid, 576 features), dense.

Padding is Keras' ``same`` (:class:`eenet.models.mlperf_tiny.SamePad2d`), and
average pooling has its window as stride and drops a remainder, as Keras'
``AveragePooling2D``. The earlier, heavier block of this module (1x1 conv to the
final stage's width, 3x3 depthwise with PyTorch's symmetric padding, global
average pooling) is the default of the arguments, and the ``trecx_*_wide``
experiments. T-RecX exits when the largest softmax probability passes a
threshold, so the confidence head defaults to eenet's ``stats`` head (which
starts as exactly that probability, see ``eenet.models.exits``).

Overthinking mitigation (:class:`MitigatedFinalHead`): the final classifier
also sees what the early exit learned, so that samples the early exit gets
right are not lost at the end ("overthinking", Kaya et al., ICML 2019). Two
forms, both adding a linear map to the backbone's own classifier, which is the
same as one dense layer on the concatenated features:

- ``trecx`` (the paper's "early-view assistance"): the early exit's depthwise
  filters are applied to the *first* ``C_e`` channels of the final feature maps
  (``C_e``: the exit depthwise conv's channels, at most the final stage's), then
  ReLU and global average pooling give ``C_e`` features for the dense layer.
  The paper's code copies the filters into a second depthwise layer before
  every batch for most of training and then lets them part; here they stay
  tied (one set of weights), and run with the exit's stride and padding (its
  code uses stride 1 on DS-CNN and MobileNetV1). Its code also flattens a small
  grid of these maps for ResNet-8 and MobileNetV1 (512 and 288 features); the
  global pooling here keeps the added dense layer at ``C_e x K`` weights. Nothing from the
  early exit's run is carried to the end, so the dynamic path and the
  exported model need no extra state.
- ``concat`` (a plain alternative): the early exit's pooled features are
  concatenated with the pooled final features before the dense layer; the
  early exit's features are carried along with the samples that go on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eenet.errors import EENetError
from eenet.models.exits import ExitHeads
from eenet.models.mlperf_tiny import SamePad2d
from eenet.models.staged import ClassifierHead

MITIGATIONS = ("trecx", "concat")
PADDINGS = ("torch", "same")


class LeadingChannels(nn.Module):
    """The first ``n`` channels of a ``(B, C, H, W)`` map (T-RecX's DS-CNN exit reads 32 of 64)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = int(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.n]

    def extra_repr(self) -> str:
        return f"n={self.n}"


def _out_len(n: int, k: int, s: int, padding: str) -> int:
    """Output length of a convolution: ``ceil(n / s)`` for ``same``, else with padding ``k // 2``."""
    if padding == "same":
        return (n + s - 1) // s
    return (n + 2 * (k // 2) - k) // s + 1


class TRecXExit(ExitHeads):
    """[1x1 conv] -> depthwise conv, stride 2, ReLU -> average pooling -> dense.

    The defaults give the earlier, heavier form (see the module docstring); the
    ``trecx_*`` experiment configs set the paper's form per model.

    Args:
        in_channels: channels of the stage output.
        num_classes: classifier outputs.
        in_size: spatial size ``(H, W)`` of the stage output (sets the pooled grid).
        width: channels of the exit's depthwise convolution (default: ``in_channels``).
        pointwise: true: a 1x1 convolution from ``in_channels`` to ``width`` comes first;
            false: the exit reads the first ``width`` channels of the stage output
            (T-RecX on DS-CNN: 32 of 64).
        kernel_size: the depthwise convolution's kernel (3; the paper: 2 after a
            1x1 conv, 3 on DS-CNN).
        stride: the depthwise convolution's stride (2).
        padding: ``torch`` (symmetric ``kernel_size // 2``) or ``same`` (Keras, the paper).
        pool: average-pooling window (and stride, remainder dropped), the pooled grid
            flattened; null: global average pooling.
        confidence_input: ``stats`` (default; starts as the max softmax probability)
            or ``features``.
    """

    def __init__(self, in_channels: int, num_classes: int, in_size: tuple[int, int] = (1, 1),
                 width: int | None = None, confidence_input: str = "stats",
                 pointwise: bool = True, kernel_size: int = 3, stride: int = 2,
                 padding: str = "torch", pool: int | None = None):
        super().__init__()
        if padding not in PADDINGS:
            raise EENetError(f"unknown T-RecX exit padding '{padding}'; accepted: "
                             f"{', '.join(PADDINGS)}")
        if kernel_size < 1 or stride < 1 or (pool is not None and pool < 1):
            raise EENetError(f"T-RecX exit kernel_size, stride and pool must be >= 1, got "
                             f"{kernel_size}, {stride}, {pool}")
        width = in_channels if width is None else int(width)
        if width < 1:
            raise EENetError(f"T-RecX exit width must be >= 1, got {width}")
        layers: list[nn.Module] = []
        if pointwise:
            self.pointwise = nn.Conv2d(in_channels, width, 1)
            layers.append(self.pointwise)
        else:
            if width > in_channels:
                raise EENetError(f"without a 1x1 convolution the T-RecX exit reads the first "
                                 f"exit.width={width} channels, but the stage has {in_channels}")
            self.pointwise = None
            if width < in_channels:
                layers.append(LeadingChannels(width))
        self.pad = (SamePad2d((kernel_size, kernel_size), (stride, stride)) if padding == "same"
                    else nn.Identity())
        self.depthwise = nn.Conv2d(width, width, kernel_size, stride,
                                   0 if padding == "same" else kernel_size // 2, groups=width)
        layers += [self.pad, self.depthwise, nn.ReLU(inplace=True)]
        if pool is None:
            layers.append(nn.AdaptiveAvgPool2d(1))
            features = width
        else:
            h, w = (_out_len(int(n), kernel_size, stride, padding) for n in in_size)
            grid = (h // pool, w // pool)
            if min(grid) < 1:
                raise EENetError(f"T-RecX exit pool={pool} is larger than the depthwise "
                                 f"conv's {h}x{w} output; give a smaller exit.pool or null")
            layers.append(nn.AvgPool2d(pool, pool))
            features = width * grid[0] * grid[1]
        self.pre = nn.Sequential(*layers, nn.Flatten(1))
        self._build_heads(features, num_classes, confidence_input)
        # a flattened grid fixes the input size, as every flattening exit ("plain")
        self.preblock = "trecx" if pool is None else "plain"

    def early_view(self, x: torch.Tensor) -> torch.Tensor:
        """The exit's depthwise filters (same weights) on the first channels of ``x``, then ReLU.

        T-RecX's mitigation (:class:`MitigatedFinalHead`); the depthwise weights
        are used functionally, so they stay registered under the exit only.
        """
        dw = self.depthwise
        z = self.pad(x[:, :dw.in_channels])
        return F.relu(F.conv2d(z, dw.weight, dw.bias, dw.stride, dw.padding, dw.dilation,
                               dw.groups))


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
            if dw is None or not hasattr(exit_block, "early_view"):
                raise EENetError("mitigation 'trecx' reuses the early exit's depthwise "
                                 "convolution: use the T-RecX exit (exit=trecx)")
            if dw.in_channels > final_channels:
                raise EENetError(f"mitigation 'trecx' applies the early exit's depthwise filters "
                                 f"({dw.in_channels} channels) to the first channels of the final "
                                 f"feature maps ({final_channels} channels): set exit.width <= "
                                 f"{final_channels}")
            # plain lists: the weights stay registered under the exit only
            self.tied = [dw]
            self.view = [exit_block]
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            extra = dw.in_channels
        else:
            extra = exit_block.num_features
        self.fc = nn.Linear(extra, num_classes, bias=False)
        nn.init.zeros_(self.fc.weight)  # starts as the backbone's own classifier

    @property
    def needs_carry(self) -> bool:
        return self.mode == "concat"

    def forward(self, x: torch.Tensor, carried: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "trecx":
            return self.fc(self.pool(self.view[0].early_view(x)))
        if carried is None:
            raise EENetError("mitigation 'concat' needs the early exit's features")
        return self.fc(carried)
