"""torchvision MobileNetV2 and MobileNetV3-Small as staged backbones.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and
Linear Bottlenecks", CVPR 2018; Howard et al., "Searching for MobileNetV3",
ICCV 2019.

``stem = features[0]`` (the first 3x3 stride-2 convolution); then one stage per
inverted-residual block of ``features`` (17 in V2, 11 in V3-Small), and a last
stage with the final 1x1 convolution of ``features`` (to 1280 channels in V2,
576 in V3-Small): 18 and 12 stages. That convolution is a stage of its own, not
part of the last block's stage or of the head, so an exit can attach after
every inverted-residual block, the last one included, and the head is exactly
torchvision's pooling and classifier: average pooling, flatten, then dropout and
a linear layer (V2) or linear, Hardswish, dropout, linear (V3). The modules are
torchvision's own, so the staged network computes exactly what the torchvision
model computes (a test checks it). Any input size works (padded convolutions).

``weights``, ``num_classes`` and ``in_chans`` are handled as for the ResNets
(:mod:`eenet.models.torchvision_common`).
"""

from __future__ import annotations

from torch import nn

from eenet.models.registry import register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone
from eenet.models.torchvision_common import (adapt_first_conv, chain_stride, default_hw,
                                             load_torchvision_model)


class TorchvisionMobileNet(StagedBackbone):
    """Staged view of a torchvision ``MobileNetV2`` or ``MobileNetV3`` (shares its modules)."""

    def __init__(self, model: nn.Module, in_chans: int = 3,
                 input_size: tuple[int, int] | None = None):
        classifier = model.classifier
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        super().__init__(linears[-1].out_features, in_chans,
                         (in_chans, *default_hw(input_size, False)))
        stem, *stages = list(model.features)
        channels = [s.out_channels for s in stages]
        strides = [chain_stride(s) for s in stages]
        # V2 pools with F.adaptive_avg_pool2d(x, (1, 1)) in its forward, V3 with its avgpool module
        avgpool = model.avgpool if hasattr(model, "avgpool") else nn.AdaptiveAvgPool2d((1, 1))
        head = ClassifierHead(nn.Sequential(avgpool, nn.Flatten(1)), classifier,
                              linears[0].in_features)
        self._finish(stem, stages, head, channels, strides, stem_reduction=chain_stride(stem))


def _build(arch: str, classifier: str, num_classes: int = 1000, in_chans: int = 3,
           weights: str | None = None, input_size: tuple[int, int] | None = None,
           **kwargs) -> TorchvisionMobileNet:
    model = load_torchvision_model(arch, weights, num_classes, classifier, **kwargs)
    adapt_first_conv(model, "features.0.0", in_chans, pretrained=bool(weights))
    return TorchvisionMobileNet(model, in_chans=in_chans, input_size=input_size)


@register_backbone
def mobilenet_v2(**kwargs) -> TorchvisionMobileNet:
    """torchvision MobileNetV2 (18 stages: 17 inverted-residual blocks, the last 1x1 conv)."""
    return _build("mobilenet_v2", "classifier.1", **kwargs)


@register_backbone
def mobilenet_v3_small(**kwargs) -> TorchvisionMobileNet:
    """torchvision MobileNetV3-Small (12 stages: 11 inverted-residual blocks, the last 1x1 conv)."""
    return _build("mobilenet_v3_small", "classifier.3", **kwargs)
