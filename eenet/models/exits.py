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

``confidence_input``: EENets' head reads the features (``features``, the
default). Trained jointly with Adam, a linear head on thousands of early
features saturates: every weight moves by about the learning rate per step,
so the logit moves by that times the features' L1 norm, and h_i ends at 1 for
every sample (measured on MNIST: z_0 between 15 and 46 on all validation
samples, so no sample is routed on). ``stats`` (an eenet option, not in the
paper) reads three class-agnostic statistics of the exit's own prediction,
without gradient: logit(max_k p_i[k]), the margin between the two largest
probabilities, and the entropy over log K; it starts as h_i = max_k p_i[k]
(weights 1, 0, 0, bias 0) and the loss then adjusts the mapping.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from eenet.errors import EENetError

PREBLOCKS = ("pool", "bnpool", "plain")
CONFIDENCE_INPUTS = ("features", "stats")


def prediction_stats(logits: torch.Tensor) -> torch.Tensor:
    """(B, 3): logit of the max softmax probability, top-2 margin, entropy / log K; no gradient.

    Written with few operations: at batch size 1 each costs microseconds of
    dispatch, which the dynamic engine pays at every early exit.
    """
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=1)
        k = logp.shape[1]
        if k > 1:
            top_logp = logp.topk(2, dim=1).values
            top = top_logp.exp()  # = the two largest probabilities
            log_top, p_top, margin = top_logp[:, 0], top[:, 0], top[:, 0] - top[:, 1]
        else:
            log_top = logp[:, 0]
            p_top = margin = log_top.exp()
        # logit(p_max) = log p_max - log(1 - p_max), finite for p_max rounding to 1
        log_rest = torch.log1p(-p_top.clamp(max=1 - 1e-7))
        ent = (logp.exp() * logp).sum(1) / -math.log(max(k, 2))
        stats = torch.stack([(log_top - log_rest).clamp(-20, 20), margin, ent], 1)
        return stats.to(logits.dtype)


class ExitHeads(nn.Module):
    """The two heads every exit has, on its pre-block features: classifier and confidence.

    Subclasses build ``self.pre`` and call :meth:`_build_heads`; ``predict(f)``
    gives ``(logits, confidence logits)``. ``stats`` confidence heads start as
    h = max softmax probability (weights 1, 0, 0, bias 0).
    """

    def _build_heads(self, features: int, num_classes: int, confidence_input: str) -> None:
        if confidence_input not in CONFIDENCE_INPUTS:
            raise EENetError(f"unknown exit confidence_input '{confidence_input}'; accepted: "
                             f"{', '.join(CONFIDENCE_INPUTS)}")
        self.classifier = nn.Linear(features, num_classes)
        self.confidence_input = confidence_input
        self.confidence = nn.Linear(features if confidence_input == "features" else 3, 1)
        if confidence_input == "stats":
            with torch.no_grad():
                self.confidence.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
                self.confidence.bias.zero_()
        self.num_features = features

    def predict(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two heads on pre-block features ``f``: ``(logits (B, K), confidence logits (B,))``."""
        logits = self.classifier(f)
        c = prediction_stats(logits) if self.confidence_input == "stats" else f
        return logits, self.confidence(c).squeeze(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (B, K), confidence logits (B,))``."""
        return self.predict(self.pre(x))


class ExitBlock(ExitHeads):
    """An early exit: ``features = pre(x)``; ``(classifier(features), confidence(features))``.

    Args:
        in_channels: channels of the stage output this exit reads.
        num_classes: classifier outputs.
        in_size: spatial size ``(H, W)`` of that output (needed by ``plain``).
        preblock: ``pool``, ``bnpool`` or ``plain``.
        convs: number of [3x3 conv, BN, ReLU] layers before the pre-block.
        width: channels of those convolutions (default: ``in_channels``).
        confidence_input: ``features`` (EENets) or ``stats`` (see module docstring).
        stride: stride of every branch convolution. 2 halves the maps at each conv, so
            that a branch on an early, full-resolution stage costs a fraction of a
            backbone block (the downsampling of SDN's internal classifiers, Kaya et al.
            2019, done with the convolutions themselves).
        width_growth: the channels are multiplied by this at each conv after the first
            (2 with stride 2 keeps every conv's MACs about equal, as in ResNets).
    """

    def __init__(self, in_channels: int, num_classes: int, in_size: tuple[int, int] = (1, 1),
                 preblock: str = "pool", convs: int = 0, width: int | None = None,
                 confidence_input: str = "features", stride: int = 1, width_growth: float = 1.0):
        super().__init__()
        if preblock not in PREBLOCKS:
            raise EENetError(f"unknown exit preblock '{preblock}'; accepted: {', '.join(PREBLOCKS)}")
        if convs < 0:
            raise EENetError(f"exit convs must be >= 0, got {convs}")
        if stride < 1 or width_growth <= 0:
            raise EENetError(f"exit stride must be >= 1 and width_growth > 0, got {stride}, "
                             f"{width_growth}")
        width = width or in_channels
        layers: list[nn.Module] = []
        c = in_channels
        h, w = in_size
        for i in range(convs):
            out = max(1, round(width * width_growth ** i))
            layers += [nn.Conv2d(c, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            c = out
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        if preblock == "bnpool":
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if preblock in ("pool", "bnpool"):
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
            features = c
        else:
            layers += [nn.Flatten(1)]
            features = c * h * w
        self.pre = nn.Sequential(*layers)
        self._build_heads(features, num_classes, confidence_input)
        self.preblock = preblock
