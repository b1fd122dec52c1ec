"""CIFAR-style VGG and DenseNet as staged backbones (32x32 images).

VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015, configurations A (11 layers) and D (16 layers):
3x3 convolutions of 64-M-128-M-256x2-M-512x2-M-512x2-M (A) or
64x2-M-128x2-M-256x3-M-512x3-M-512x3-M (D), M a 2x2 max-pool, each convolution
followed by BatchNorm (Ioffe & Szegedy, ICML 2015) and ReLU. For 32x32 images
the five max-pools leave a 1x1 map, so the three 4096-wide layers of the
ImageNet classifier become global average pooling and a small classifier
(``hidden`` units, ReLU, dropout, output layer; ``hidden=0``: one linear
layer). Stages: one per convolution with its max-pool, the first convolution
being the stem, as in :mod:`eenet.models.torchvision_vgg` (7 and 12 stages).
Inputs: any channels, at least 32x32 (larger inputs are pooled globally).

DenseNet: Huang, Liu, van der Maaten, Weinberger, "Densely Connected
Convolutional Networks", CVPR 2017, section 4 (CIFAR): a 3x3 convolution
(16 filters, or 2k for DenseNet-BC), three dense blocks of equal depth with
transitions [BN, ReLU, 1x1 conv, 2x2 average pool] between them, then BN, ReLU,
global average pooling and a linear layer. A layer is [BN, ReLU, 3x3 conv] with
k filters (growth rate), or for DenseNet-BC the bottleneck [BN, ReLU, 1x1 conv
to 4k, BN, ReLU, 3x3 conv to k]; its output is concatenated to its input.
DenseNet-BC halves the channels at each transition (compression 0.5).
Depth L gives (L - 4) / 3 layers per block, or (L - 4) / 6 with bottlenecks:
DenseNet-40 (k=12, 1.0 M parameters) and DenseNet-BC-100 (k=12, 0.8 M).
Stages: every dense layer and every transition (38 and 50 stages), so exits can
attach after any layer: with only three blocks, block-level stages would give
four exit positions, the first (after block 1) already after about half of
DenseNet-40's MACs and two thirds of DenseNet-BC-100's (32x32). Inputs: any
channels, at least 4x4 (two 2x2 poolings).
"""

from __future__ import annotations

import torch
from torch import nn

from eenet.errors import EENetError
from eenet.models.registry import register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone, global_pool

VGG_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _init_convs_and_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class CifarVGG(StagedBackbone):
    """VGG with BatchNorm for small images; one stage per convolution (the first is the stem).

    Args:
        depth: 11 or 16 (configurations A and D).
        num_classes: classifier outputs.
        in_chans: input channels.
        hidden: width of the classifier's hidden layer; 0 for a single linear layer.
        dropout: dropout before the output layer (with ``hidden``).
        input_size: default input ``(H, W)`` for shape probes, at least 32x32.
    """

    def __init__(self, depth: int = 16, num_classes: int = 10, in_chans: int = 3,
                 hidden: int = 512, dropout: float = 0.5,
                 input_size: tuple[int, int] | None = None):
        if depth not in VGG_PLANS:
            raise EENetError(f"CIFAR VGG depth must be one of {sorted(VGG_PLANS)}, got {depth}")
        hw = tuple(input_size) if input_size else (32, 32)
        if min(hw) < 32:
            raise EENetError("CIFAR VGG needs inputs of at least 32x32 (five 2x2 max-pools), "
                             f"got input_size {hw[0]}x{hw[1]}")
        super().__init__(num_classes, in_chans, (in_chans, *hw))
        layers: list[list[nn.Module]] = []
        channels, c = [], in_chans
        for v in VGG_PLANS[depth]:
            if v == "M":
                layers[-1].append(nn.MaxPool2d(2, 2))
                continue
            layers.append([nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)])
            channels.append(v)
            c = v
        stem, *stages = [nn.Sequential(*layer) for layer in layers]
        strides = [2 if isinstance(layer[-1], nn.MaxPool2d) else 1 for layer in stages]
        fc: nn.Module = (nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True),
                                       nn.Dropout(dropout), nn.Linear(hidden, num_classes))
                         if hidden else nn.Linear(c, num_classes))
        head = ClassifierHead(global_pool(), fc, c)
        stem_reduction = 2 if isinstance(stem[-1], nn.MaxPool2d) else 1
        self._finish(stem, stages, head, channels[1:], strides, stem_reduction)
        _init_convs_and_norms(self)


class DenseLayer(nn.Module):
    """One dense layer: ``cat([x, f(x)])``, f = [BN, ReLU, (1x1 conv, BN, ReLU), 3x3 conv]."""

    def __init__(self, in_channels: int, growth: int, bottleneck: bool, drop_rate: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
        c = in_channels
        if bottleneck:
            layers += [nn.Conv2d(c, 4 * growth, 1, bias=False), nn.BatchNorm2d(4 * growth),
                       nn.ReLU(inplace=True)]
            c = 4 * growth
        layers.append(nn.Conv2d(c, growth, 3, 1, 1, bias=False))
        if drop_rate > 0:
            layers.append(nn.Dropout(drop_rate))
        self.body = nn.Sequential(*layers)
        self.out_channels = in_channels + growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class Transition(nn.Sequential):
    """[BN, ReLU, 1x1 conv, 2x2 average pool] between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0):
        layers: list[nn.Module] = [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                                   nn.Conv2d(in_channels, out_channels, 1, bias=False)]
        if drop_rate > 0:
            layers.append(nn.Dropout(drop_rate))
        super().__init__(*layers, nn.AvgPool2d(2, 2))
        self.out_channels = out_channels


class CifarDenseNet(StagedBackbone):
    """DenseNet with three dense blocks for small images; one stage per dense layer and transition.

    Args:
        depth: L; (L - 4) must be divisible by 3 (by 6 with ``bottleneck``).
        growth: growth rate k.
        bottleneck: DenseNet-BC layers (1x1 bottleneck to 4k channels).
        compression: theta, the fraction of channels a transition keeps.
        num_classes: classifier outputs.
        in_chans: input channels.
        drop_rate: dropout after every convolution but the first (the paper's 0.2
            without data augmentation), 0 for none.
        input_size: default input ``(H, W)`` for shape probes.
    """

    def __init__(self, depth: int = 100, growth: int = 12, bottleneck: bool = True,
                 compression: float = 0.5, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, input_size: tuple[int, int] | None = None):
        per_layer = 6 if bottleneck else 3
        if depth < 4 + per_layer or (depth - 4) % per_layer:
            raise EENetError(f"CIFAR DenseNet depth must be 4 + {per_layer}n with n >= 1"
                             f"{' (bottleneck layers)' if bottleneck else ''}, got {depth}")
        if not 0 < compression <= 1:
            raise EENetError(f"DenseNet compression must be in (0, 1], got {compression}")
        hw = tuple(input_size) if input_size else (32, 32)
        if min(hw) < 4:
            raise EENetError(f"CIFAR DenseNet needs inputs of at least 4x4, got {hw[0]}x{hw[1]}")
        super().__init__(num_classes, in_chans, (in_chans, *hw))
        n = (depth - 4) // per_layer
        c = 2 * growth if bottleneck else 16
        stem = nn.Conv2d(in_chans, c, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        strides: list[int] = []
        for block in range(3):
            for _ in range(n):
                stages.append(DenseLayer(c, growth, bottleneck, drop_rate))
                strides.append(1)
                c = stages[-1].out_channels
            if block < 2:
                stages.append(Transition(c, int(compression * c), drop_rate))
                strides.append(2)
                c = stages[-1].out_channels
        pool = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), global_pool())
        head = ClassifierHead(pool, nn.Linear(c, num_classes), c)
        self._finish(stem, stages, head, [s.out_channels for s in stages], strides,
                     stem_reduction=1)
        _init_convs_and_norms(self)


@register_backbone
def cifar_vgg11_bn(**kwargs) -> CifarVGG:
    """CIFAR VGG-11 with BatchNorm (7 stages, one per conv after the first)."""
    return CifarVGG(depth=11, **kwargs)


@register_backbone
def cifar_vgg16_bn(**kwargs) -> CifarVGG:
    """CIFAR VGG-16 with BatchNorm (12 stages, one per conv after the first)."""
    return CifarVGG(depth=16, **kwargs)


@register_backbone
def cifar_densenet40(**kwargs) -> CifarDenseNet:
    """CIFAR DenseNet (L=40, k=12, no bottleneck, no compression; 38 stages)."""
    kwargs = {"growth": 12, **kwargs}
    return CifarDenseNet(depth=40, bottleneck=False, compression=1.0, **kwargs)


@register_backbone
def cifar_densenet_bc100(**kwargs) -> CifarDenseNet:
    """CIFAR DenseNet-BC (L=100, k=12, bottlenecks, compression 0.5; 50 stages)."""
    kwargs = {"growth": 12, **kwargs}
    return CifarDenseNet(depth=100, bottleneck=True, compression=0.5, **kwargs)
