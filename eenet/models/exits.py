"""Exit blocks: a pre-block feeding a classifier head and a confidence head.

Demir & Akbas, "Early-exit Convolutional Neural Networks" (EENets): every exit
block has a classification branch (logits, softmax p_i) and a separate
confidence branch (a linear layer and a sigmoid, h_i in (0, 1)) on the same
features. The pre-block that produces the features is one of

- ``pool``: global average pooling;
- ``bnpool``: BatchNorm, ReLU, then global average pooling;
- ``plain``: flatten the feature map as it is.

Optionally ``convs`` = k layers of [3x3 convolution without bias, BatchNorm,
ReLU] of ``width`` channels run first: the convolutional branch of PTEENet
(Lahiany & Aperstein) and of SDN-style internal classifiers.

The confidence head returns a logit z_i with h_i = sigmoid(z_i); losses use
log-sigmoid of it, which stays finite when h_i rounds to exactly 0 or 1.
"""

from __future__ import annotations

import torch
from torch import nn

from eenet.errors import EENetError

PREBLOCKS = ("pool", "bnpool", "plain")


class ExitBlock(nn.Module):
    """An early exit: ``features = pre(x)``; ``(classifier(features), confidence(features))``.

    Args:
        in_channels: channels of the stage output this exit reads.
        num_classes: classifier outputs.
        in_size: spatial size ``(H, W)`` of that output (needed by ``plain``).
        preblock: ``pool``, ``bnpool`` or ``plain``.
        convs: number of [3x3 conv, BN, ReLU] layers before the pre-block.
        width: channels of those convolutions (default: ``in_channels``).
    """

    def __init__(self, in_channels: int, num_classes: int, in_size: tuple[int, int] = (1, 1),
                 preblock: str = "pool", convs: int = 0, width: int | None = None):
        super().__init__()
        if preblock not in PREBLOCKS:
            raise EENetError(f"unknown exit preblock '{preblock}'; accepted: {', '.join(PREBLOCKS)}")
        if convs < 0:
            raise EENetError(f"exit convs must be >= 0, got {convs}")
        width = width or in_channels
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(convs):
            layers += [nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            c = width
        if preblock == "bnpool":
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if preblock in ("pool", "bnpool"):
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
            features = c
        else:
            layers += [nn.Flatten(1)]
            features = c * in_size[0] * in_size[1]
        self.pre = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_classes)
        self.confidence = nn.Linear(features, 1)
        self.num_features = features
        self.preblock = preblock

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (B, K), confidence logits (B,))``."""
        f = self.pre(x)
        return self.classifier(f), self.confidence(f).squeeze(1)
