"""torchvision ResNet-18/34/50 as staged backbones.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (ImageNet
variants). The torchvision model is cut into ``stem = conv1, bn1, relu,
maxpool``, one stage per residual block of ``layer1..layer4`` and ``head =
avgpool, flatten, fc``. The stages are torchvision's own modules, so the staged
network computes exactly what the torchvision model computes (a test checks it)
and torchvision's pretrained weights apply unchanged.

``weights`` takes a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``,
...): torchvision downloads them for users online; without a network the error
says so. ``small_input=True`` swaps the stem for a 3x3 stride-1 convolution
without max-pooling, the usual adaptation for 32x32 images.
"""

from __future__ import annotations

import torchvision
from torch import nn

from eenet.models.registry import register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone
from eenet.models.torchvision_common import adapt_first_conv, default_hw, load_torchvision_model


class TorchvisionResNet(StagedBackbone):
    """Staged view of a ``torchvision.models.ResNet`` (shares its modules)."""

    def __init__(self, model: torchvision.models.ResNet, in_chans: int = 3,
                 input_size: tuple[int, int] | None = None):
        num_classes = model.fc.out_features
        hw = tuple(input_size) if input_size else (224, 224)
        super().__init__(num_classes, in_chans, (in_chans, *hw))
        small = model.conv1.stride == (1, 1)
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        stages, channels, strides = [], [], []
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                stages.append(block)
                out = block.bn3 if hasattr(block, "bn3") else block.bn2
                channels.append(out.num_features)
                strides.append(block.conv1.stride[0] * block.conv2.stride[0]
                               * (block.conv3.stride[0] if hasattr(block, "conv3") else 1))
        pool = nn.Sequential(model.avgpool, nn.Flatten(1))
        head = ClassifierHead(pool, model.fc, model.fc.in_features)
        stem_reduction = (1 if small else 2) * (1 if isinstance(model.maxpool, nn.Identity) else 2)
        self._finish(stem, stages, head, channels, strides, stem_reduction)


def _build(arch: str, num_classes: int = 1000, in_chans: int = 3, weights: str | None = None,
           small_input: bool = False, input_size: tuple[int, int] | None = None,
           **kwargs) -> TorchvisionResNet:
    model = load_torchvision_model(arch, weights, num_classes, "fc", **kwargs)
    adapt_first_conv(model, "conv1", in_chans, pretrained=bool(weights), small_input=small_input)
    if small_input:
        model.maxpool = nn.Identity()
    hw = default_hw(input_size, small_input)
    return TorchvisionResNet(model, in_chans=in_chans, input_size=hw)


@register_backbone
def resnet18(**kwargs) -> TorchvisionResNet:
    """torchvision ResNet-18 (8 stages)."""
    return _build("resnet18", **kwargs)


@register_backbone
def resnet34(**kwargs) -> TorchvisionResNet:
    """torchvision ResNet-34 (16 stages)."""
    return _build("resnet34", **kwargs)


@register_backbone
def resnet50(**kwargs) -> TorchvisionResNet:
    """torchvision ResNet-50 (16 bottleneck stages)."""
    return _build("resnet50", **kwargs)
