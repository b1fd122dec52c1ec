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
"""

from __future__ import annotations

import torch
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
