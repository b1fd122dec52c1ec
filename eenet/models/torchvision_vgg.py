"""torchvision VGG-11 and VGG-16 with BatchNorm as staged backbones.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015 (configurations A and D), with BatchNorm after every
convolution (Ioffe & Szegedy, ICML 2015) as in torchvision's ``vgg*_bn``.
PTEENet (Lahiany & Aperstein, IEEE Access 2022) attaches exits to VGG.

Stages: one per convolution layer, [3x3 conv, BN, ReLU], with the max-pool
that follows it, if any, at the end of the same stage. The first layer (with
its max-pool in VGG-11) is the stem, so VGG-11 has 7 stages and VGG-16 has 12.
Why per layer and not per pooling block: with one stage per block, VGG-16's
first exit position would already be after 12.5% of its 15.5 GMACs (224x224)
and the five positions are 1.4 to 4.6 GMACs apart, too coarse for EENets'
cost-based placements (``fine`` aims at 5% and 9.75% of the MACs); per-layer
stages are 0.09 to 1.85 GMACs apart and still offer every block end (the stage
of a block's last layer ends with its max-pool), plus the positions inside
blocks that SDN's internal classifiers on VGG-16 use (Kaya et al.,
"Shallow-Deep Networks", ICML 2019). An exit inside a block reads a map at full
resolution of that block, so exit blocks with convolutions cost more there.

Head: torchvision's ``avgpool`` (adaptive, to 7x7), flatten and ``classifier``
(two 4096-wide layers with ReLU and dropout, then the output layer). The
stages, pool and classifier are torchvision's own modules, so the staged
network computes exactly what the torchvision model computes (a test checks it).

``small_input=True`` is for 32x32 to 63x63 images, whose last feature map is
1x1: torchvision's 7x7 pool then only repeats each value 49 times, so the pool
becomes a 1x1 pool and the first classifier layer's weights are summed over
those 49 copies (W'[:, c] = sum_k W[:, 49c + k]): the same function for those
inputs (up to float rounding), and a 512-wide instead of a 25,088-wide first
layer (102.8 M fewer parameters), pretrained classifier weights included.
Inputs must be at least 32x32 (five 2x2 max-pools).

``weights``, ``num_classes`` and ``in_chans`` are handled as for the ResNets
(:mod:`eenet.models.torchvision_common`).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from eenet.errors import EENetError
from eenet.models.registry import register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone
from eenet.models.torchvision_common import (adapt_first_conv, chain_stride, default_hw,
                                             load_torchvision_model)

MIN_SIZE = 32


def conv_layers(features: nn.Sequential) -> list[nn.Sequential]:
    """Group VGG ``features`` into [conv, (BN), ReLU, (max-pool)] layers, keeping the modules."""
    groups: list[list[nn.Module]] = []
    for m in features:
        if isinstance(m, nn.Conv2d) or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return [nn.Sequential(*g) for g in groups]


class TorchvisionVGG(StagedBackbone):
    """Staged view of a ``torchvision.models.VGG`` (shares its modules); a stage per conv."""

    def __init__(self, model: torchvision.models.VGG, in_chans: int = 3,
                 input_size: tuple[int, int] | None = None):
        fc = model.classifier
        num_classes = fc[-1].out_features
        super().__init__(num_classes, in_chans, (in_chans, *default_hw(input_size, False)))
        layers = conv_layers(model.features)
        stem, stages = layers[0], layers[1:]
        channels = [layer[0].out_channels for layer in stages]
        strides = [chain_stride(layer) for layer in stages]
        pool = nn.Sequential(model.avgpool, nn.Flatten(1))
        head = ClassifierHead(pool, fc, fc[0].in_features)
        self._finish(stem, stages, head, channels, strides, stem_reduction=chain_stride(stem))


def fold_pool_for_small_input(model: torchvision.models.VGG) -> None:
    """Pool to 1x1 and sum the first linear layer's weights over the 7x7 copies (see module doc)."""
    old = model.classifier[0]
    cells = 7 * 7
    if not isinstance(model.avgpool, nn.AdaptiveAvgPool2d) or old.in_features % cells:
        raise EENetError("small_input expects torchvision's 7x7 pool and a 512*7*7 "
                         "classifier input")
    new = nn.Linear(old.in_features // cells, old.out_features)
    with torch.no_grad():
        new.weight.copy_(old.weight.view(old.out_features, -1, cells).sum(2))
        new.bias.copy_(old.bias)
    model.classifier[0] = new
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))


def _build(arch: str, num_classes: int = 1000, in_chans: int = 3, weights: str | None = None,
           small_input: bool = False, input_size: tuple[int, int] | None = None,
           **kwargs) -> TorchvisionVGG:
    hw = default_hw(input_size, small_input)
    if min(hw) < MIN_SIZE:
        raise EENetError(f"{arch} needs inputs of at least {MIN_SIZE}x{MIN_SIZE} "
                         f"(five 2x2 max-pools), got input_size {hw[0]}x{hw[1]}")
    model = load_torchvision_model(arch, weights, num_classes, "classifier.6", **kwargs)
    adapt_first_conv(model, "features.0", in_chans, pretrained=bool(weights))
    if small_input:
        fold_pool_for_small_input(model)
    return TorchvisionVGG(model, in_chans=in_chans, input_size=hw)


@register_backbone
def vgg11_bn(**kwargs) -> TorchvisionVGG:
    """torchvision VGG-11 with BatchNorm (stem: first conv and pool; 7 stages, one per conv)."""
    return _build("vgg11_bn", **kwargs)


@register_backbone
def vgg16_bn(**kwargs) -> TorchvisionVGG:
    """torchvision VGG-16 with BatchNorm (stem: first conv; 12 stages, one per conv)."""
    return _build("vgg16_bn", **kwargs)
