"""MLPerf Tiny reference CNNs as staged backbones.

Banbury et al., "MLPerf Tiny Benchmark", NeurIPS Datasets and Benchmarks 2021.
The image-classification reference is a ResNet-8 for 32x32 CIFAR-10: a 3x3
convolution with 16 filters, three residual stacks of one block each (16, 32
and 64 filters; stacks 2 and 3 have stride 2 and a 1x1 convolution without
BatchNorm on the shortcut), average pooling and a dense layer; convolutions
carry a bias as in the Keras reference, giving 78,666 parameters for 10
classes (BatchNorm running statistics included). T-RecX (Ghanathe & Wilton)
attaches its early exit to this network after the first stack.

Stride-2 convolutions use symmetric padding of 1 (PyTorch) where Keras' ``same``
pads one pixel on the bottom/right only; trained from scratch this does not
matter, but weights converted from the Keras reference would need a shift.

Keyword spotting (``dscnn_kws``): the reference DS-CNN of Zhang et al., "Hello
Edge: Keyword Spotting on Microcontrollers" (2017), as in MLPerf Tiny's
``keras_model.py``: input 1x49x10 MFCC; a 10x4 convolution with 64 filters and
stride 2, BN, ReLU (dropout 0.2); four depthwise-separable blocks (3x3
depthwise + BN + ReLU, 1x1 pointwise with 64 filters + BN + ReLU); dropout 0.4,
average pooling over the whole 25x5 map and a dense layer to 12 classes. It
has 24,908 parameters counted as Keras does (BatchNorm moving statistics
included; 23,756 trainable, the count NXP's eIQ model zoo lists for the MLPerf
Tiny model) and 2.66 M MACs in its convolutions and dense layer (2.81 M as
fvcore counts them, BatchNorm and pooling included). Hello Edge's "DS-CNN
small" row quotes 38.6 KB and 5.4 M operations: a memory footprint, not a
parameter count, and 5.4 M operations are 2.7 M MACs.

Visual Wake Words (``mobilenet_v1_vww``): MobileNetV1 (Howard et al.,
"MobileNets", 2017) with width multiplier 0.25 at 3x96x96 and 2 classes, as in
MLPerf Tiny's ``vww_model.py``: a 3x3 stride-2 convolution with 8 filters and
the 13 depthwise-separable blocks (16 ... 256 filters), plain ReLU, biases on
every convolution, global average pooling and a dense layer: 221,794
parameters counted as Keras does (216,322 trainable; NXP's eIQ model zoo lists
221,794 for the MLPerf Tiny model) and 7.49 M MACs in convolutions and the
dense layer (7.96 M as fvcore counts them; the model card's "15 MOPS").

Unlike ResNet-8 above, these two follow their Keras references exactly, padding
included: ``same`` padding
is computed as TensorFlow does (:class:`SamePad2d`), so the 10x4 stride-2 stem
of the DS-CNN pads 4 rows on top and 5 below, and stride-2 3x3 convolutions on
even sizes pad only the bottom/right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eenet.models.registry import register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone, global_pool


class TinyResidualStack(nn.Module):
    """One MLPerf Tiny residual stack: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (nn.Identity() if stride == 1 and in_planes == planes
                         else nn.Conv2d(in_planes, planes, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(self.shortcut(x) + y)


class TinyResNet(StagedBackbone):
    """MLPerf Tiny ResNet-8: three stages (one residual stack each)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64),
                 input_size: tuple[int, int] | None = None):
        hw = tuple(input_size) if input_size else (32, 32)
        super().__init__(num_classes, in_chans, (in_chans, *hw))
        stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1),
                             nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, strides = [], []
        in_planes = widths[0]
        for g, planes in enumerate(widths):
            stride = 1 if g == 0 else 2
            stages.append(TinyResidualStack(in_planes, planes, stride))
            strides.append(stride)
            in_planes = planes
        head = ClassifierHead(global_pool(), nn.Linear(in_planes, num_classes), in_planes)
        self._finish(stem, stages, head, list(widths), strides, stem_reduction=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)


@register_backbone
def resnet8_tiny(**kwargs) -> TinyResNet:
    """MLPerf Tiny ResNet-8 (image classification reference, 3 stages)."""
    return TinyResNet(**kwargs)


# ----------------------------------------------------------------------------- depthwise-separable


class SamePad2d(nn.Module):
    """Zero padding as Keras/TensorFlow ``padding="same"`` (Keras stays exact).

    For input length ``n``, kernel ``k`` and stride ``s`` the output length is
    ``ceil(n / s)`` and the padding is

        total  = max((ceil(n / s) - 1) * s + k - n, 0)
        before = total // 2,   after = total - before

    so odd totals put the extra row/column at the bottom/right. It is computed
    from the input's size at every call, so any input size works. fvcore
    ignores the padding (``aten::constant_pad_nd`` costs nothing).
    """

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int]):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)

    @staticmethod
    def amounts(n: int, k: int, s: int) -> tuple[int, int]:
        """``(before, after)`` padding of one axis."""
        # ceil(n / s) written as (n + s - 1) // s: with -(-n // s) the traced ONNX
        # graph truncates the negative division toward zero and pads one row short
        total = max(((n + s - 1) // s - 1) * s + k - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self.amounts(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = self.amounts(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))


def same_conv(in_chans: int, out_chans: int, kernel_size: int | tuple[int, int],
              stride: int = 1, groups: int = 1) -> nn.Module:
    """A convolution (with bias, as Keras' default) padded like Keras ``padding="same"``.

    Odd kernels at stride 1 pad symmetrically, which PyTorch's own padding does;
    every other case gets a :class:`SamePad2d` in front of an unpadded conv.
    """
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if stride == 1 and k[0] % 2 == 1 and k[1] % 2 == 1:
        return nn.Conv2d(in_chans, out_chans, k, 1, (k[0] // 2, k[1] // 2), groups=groups)
    return nn.Sequential(SamePad2d(k, (stride, stride)),
                         nn.Conv2d(in_chans, out_chans, k, stride, 0, groups=groups))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU (Howard et al. 2017, fig. 3)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        self.depthwise = same_conv(in_chans, in_chans, 3, stride, groups=in_chans)
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.pointwise = nn.Conv2d(in_chans, out_chans, 1)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.depthwise(x)))
        return self.relu(self.bn2(self.pointwise(x)))


def _init_convs(model: nn.Module) -> None:
    """He-normal (fan-in) weights and zero biases.

    The VWW reference uses ``he_normal``; the KWS reference keeps Keras' default
    Glorot-uniform. He-normal for both, as ResNet-8 here, for training from scratch.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class DSCNN(StagedBackbone):
    """MLPerf Tiny keyword-spotting DS-CNN: four stages (one depthwise-separable block each).

    Input: ``(1, 49, 10)`` MFCC (49 frames of 10 coefficients). Stem: 10x4 conv,
    stride 2, ``same`` padding, BN, ReLU, dropout 0.2 -> ``(64, 25, 5)``. Stages:
    four 3x3 depthwise + 1x1 pointwise blocks of 64 filters at stride 1. Head:
    dropout 0.4, average pooling over the whole map, dense layer.
    """

    def __init__(self, num_classes: int = 12, in_chans: int = 1, width: int = 64,
                 blocks: int = 4, input_size: tuple[int, int] | None = None):
        hw = tuple(input_size) if input_size else (49, 10)
        super().__init__(num_classes, in_chans, (in_chans, *hw))
        stem = nn.Sequential(same_conv(in_chans, width, (10, 4), 2), nn.BatchNorm2d(width),
                             nn.ReLU(inplace=True), nn.Dropout(0.2))
        stages = [DepthwiseSeparable(width, width) for _ in range(blocks)]
        pool = nn.Sequential(nn.Dropout(0.4), *global_pool())
        head = ClassifierHead(pool, nn.Linear(width, num_classes), width)
        self._finish(stem, stages, head, [width] * blocks, [1] * blocks, stem_reduction=2)
        _init_convs(self)


#: MobileNetV1's 13 depthwise-separable blocks at width 1.0: (output channels, stride).
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                       (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(StagedBackbone):
    """MobileNetV1 (Howard et al. 2017, table 1): 13 stages, one depthwise-separable block each.

    Stem: 3x3 conv with ``32 * alpha`` filters, stride 2, BN, ReLU. Channel counts
    are ``int(c * alpha)`` as in Keras; every convolution is padded ``same``.
    Head: global average pooling and a dense layer. As the MLPerf Tiny reference
    it uses plain ReLU (not ReLU6), convolution biases, and no dropout.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 3, alpha: float = 0.25,
                 input_size: tuple[int, int] | None = None):
        hw = tuple(input_size) if input_size else (96, 96)
        super().__init__(num_classes, in_chans, (in_chans, *hw))
        stem_width = int(32 * alpha)
        stem = nn.Sequential(same_conv(in_chans, stem_width, 3, 2), nn.BatchNorm2d(stem_width),
                             nn.ReLU(inplace=True))
        stages, channels, strides = [], [], []
        c = stem_width
        for base, stride in MOBILENET_V1_BLOCKS:
            out = int(base * alpha)
            stages.append(DepthwiseSeparable(c, out, stride))
            channels.append(out)
            strides.append(stride)
            c = out
        head = ClassifierHead(global_pool(), nn.Linear(c, num_classes), c)
        self._finish(stem, stages, head, channels, strides, stem_reduction=2)
        _init_convs(self)


@register_backbone
def dscnn_kws(**kwargs) -> DSCNN:
    """MLPerf Tiny DS-CNN (keyword spotting reference, 1x49x10 MFCC, 12 classes, 4 stages)."""
    return DSCNN(**kwargs)


@register_backbone
def mobilenet_v1_vww(**kwargs) -> MobileNetV1:
    """MLPerf Tiny MobileNetV1 0.25x (VWW reference, 3x96x96, 2 classes, 13 stages)."""
    kwargs.setdefault("alpha", 0.25)
    return MobileNetV1(**kwargs)
