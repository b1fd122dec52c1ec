"""torchvision DenseNet-121 as a staged backbone.

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional
Networks", CVPR 2017 (the ImageNet DenseNet-BC-121, growth rate 32, dense
blocks of 6, 12, 24 and 16 layers). PTEENet (Lahiany & Aperstein, IEEE Access
2022) attaches exits to DenseNets.

``stem = conv0, norm0, relu0, pool0``; the stages are torchvision's own modules
in order: dense block 1, transition 1, dense block 2, transition 2, dense
block 3, transition 3, dense block 4 (7 stages). Exits can attach after a dense
block (the concatenation of every feature map of the block, at full
resolution) or after a transition (compressed to half the channels and pooled
2x2, cheaper for exit blocks with convolutions). The final ``norm5`` and the
ReLU belong to the head's pool part, so the last stage ends like the others,
with a dense block's raw output, and the head computes exactly torchvision's
``relu(norm5(features)) -> adaptive_avg_pool2d(1) -> flatten -> classifier``
(a test checks the whole network against the torchvision model).

``small_input=True`` swaps ``conv0`` (7x7, stride 2) for a 3x3 stride-1
convolution and drops ``pool0``, as for the ResNets, for 32x32 images. Inputs
must be at least 32x32 without it (the network reduces by 32) and 8x8 with it.
``weights``, ``num_classes`` and ``in_chans`` are handled as for the ResNets
(:mod:`eenet.models.torchvision_common`).
"""

from __future__ import annotations

import torchvision
from torch import nn

from eenet.errors import EENetError
from eenet.models.registry import register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone
from eenet.models.torchvision_common import (adapt_first_conv, chain_stride, default_hw,
                                             load_torchvision_model)


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a dense block (input + layers x growth) or a transition."""
    if hasattr(stage, "conv"):  # _Transition
        return stage.conv.out_channels
    layers = list(stage.children())
    return layers[0].norm1.num_features + sum(layer.conv2.out_channels for layer in layers)


class TorchvisionDenseNet(StagedBackbone):
    """Staged view of a ``torchvision.models.DenseNet`` (shares its modules)."""

    def __init__(self, model: torchvision.models.DenseNet, in_chans: int = 3,
                 input_size: tuple[int, int] | None = None):
        super().__init__(model.classifier.out_features, in_chans,
                         (in_chans, *default_hw(input_size, False)))
        f = model.features
        stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
        stages = [m for name, m in f.named_children()
                  if name.startswith(("denseblock", "transition"))]
        channels = [_out_channels(s) for s in stages]
        strides = [chain_stride(s) for s in stages]
        # torchvision: F.relu(features, inplace=True) -> adaptive_avg_pool2d((1, 1)) -> flatten
        pool = nn.Sequential(f.norm5, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)),
                             nn.Flatten(1))
        head = ClassifierHead(pool, model.classifier, model.classifier.in_features)
        self._finish(stem, stages, head, channels, strides, stem_reduction=chain_stride(stem))


def _build(arch: str, num_classes: int = 1000, in_chans: int = 3, weights: str | None = None,
           small_input: bool = False, input_size: tuple[int, int] | None = None,
           **kwargs) -> TorchvisionDenseNet:
    hw = default_hw(input_size, small_input)
    least = 8 if small_input else 32
    if min(hw) < least:
        raise EENetError(f"{arch} needs inputs of at least {least}x{least}"
                         f"{' with small_input' if small_input else ' (or small_input: true)'}, "
                         f"got input_size {hw[0]}x{hw[1]}")
    model = load_torchvision_model(arch, weights, num_classes, "classifier", **kwargs)
    adapt_first_conv(model, "features.conv0", in_chans, pretrained=bool(weights),
                     small_input=small_input)
    if small_input:
        model.features.pool0 = nn.Identity()
    return TorchvisionDenseNet(model, in_chans=in_chans, input_size=hw)


@register_backbone
def densenet121(**kwargs) -> TorchvisionDenseNet:
    """torchvision DenseNet-121 (7 stages: 4 dense blocks and 3 transitions)."""
    return _build("densenet121", **kwargs)
