"""CIFAR-style ResNets with 6n+2 layers (resnet20/32/44/56/110) as staged backbones.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
section 4.2: a 3x3 convolution with 16 filters, then three groups of n basic
blocks with 16, 32 and 64 filters (the first block of groups 2 and 3 has stride
2), global average pooling and a fully connected layer: 6n+2 weighted layers.
Every basic block is one stage, so exits can attach after any block, as in
EENets (Demir & Akbas), which uses these networks.

Shortcuts that change shape use a 1x1 convolution with BatchNorm by default
(``shortcut="conv"``, the paper's option B, as EENets' ResNets do); ``"pad"`` is
the paper's parameter-free option A (subsample and zero-pad channels).
The networks accept any input size (8x8 digits, 28x28 MNIST, 32x32 CIFAR) and
any number of input channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eenet.errors import EENetError
from eenet.models.registry import register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone, global_pool


class PadShortcut(nn.Module):
    """Option A shortcut: spatial subsampling by ``stride`` and zero-padding of channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "conv":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            raise EENetError(f"unknown shortcut '{shortcut}'; accepted: conv, pad")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(StagedBackbone):
    """ResNet of depth 6n+2 for small images; one stage per basic block.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs.
        in_chans: input channels (1 for MNIST and digits, 3 for CIFAR).
        widths: filters of the three groups.
        shortcut: ``conv`` (option B) or ``pad`` (option A).
        input_size: default input ``(C, H, W)`` used for shape probes; the
            network itself accepts any size.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64), shortcut: str = "conv",
                 input_size: tuple[int, int] | None = None):
        if depth < 8 or (depth - 2) % 6:
            raise EENetError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        hw = tuple(input_size) if input_size else (32, 32)
        super().__init__(num_classes, in_chans, (in_chans, *hw))
        n = (depth - 2) // 6
        stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, channels, strides = [], [], []
        in_planes = widths[0]
        for g, planes in enumerate(widths):
            for b in range(n):
                stride = 2 if (g > 0 and b == 0) else 1
                stages.append(BasicBlock(in_planes, planes, stride, shortcut))
                channels.append(planes)
                strides.append(stride)
                in_planes = planes
        head = ClassifierHead(global_pool(), nn.Linear(in_planes, num_classes), in_planes)
        self._finish(stem, stages, head, channels, strides, stem_reduction=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _cifar_resnet(depth: int, **kwargs) -> CifarResNet:
    return CifarResNet(depth=depth, **kwargs)


@register_backbone
def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (n=3, 9 stages)."""
    return _cifar_resnet(20, **kwargs)


@register_backbone
def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32 (n=5, 15 stages)."""
    return _cifar_resnet(32, **kwargs)


@register_backbone
def resnet44(**kwargs) -> CifarResNet:
    """ResNet-44 (n=7, 21 stages)."""
    return _cifar_resnet(44, **kwargs)


@register_backbone
def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (n=9, 27 stages)."""
    return _cifar_resnet(56, **kwargs)


@register_backbone
def resnet110(**kwargs) -> CifarResNet:
    """ResNet-110 (n=18, 54 stages)."""
    return _cifar_resnet(110, **kwargs)
