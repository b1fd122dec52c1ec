"""The staged-backbone contract: a network cut into an ordered list of stages.

Every backbone in eenet is ``stem -> stages[0] -> ... -> stages[S-1] -> head``.
Exits attach after stages; the static path (all exits) and the dynamic path
(per-sample early exit) both walk this list, so a backbone only has to describe
its stages once. Each stage records its output channels, its own stride and its
cumulative reduction (as timm's ``feature_info`` does).

Stages are always called as modules (``stage(x)``, never ``stage.forward(x)``)
so that fvcore attributes their cost to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StageInfo:
    """Where an exit may attach: the output of one stage.

    Attributes:
        name: dotted module name of the stage inside the backbone (``stages.3``).
        channels: channels of the stage's output.
        stride: the stage's own spatial stride.
        reduction: cumulative stride from the input to the stage's output.
    """

    name: str
    channels: int
    stride: int
    reduction: int

    def as_dict(self) -> dict:
        return asdict(self)


class ClassifierHead(nn.Module):
    """The backbone's own classifier: ``fc(pool(x))``.

    ``pool`` maps the last feature map to a flat feature vector ("pre-logits"),
    ``fc`` maps it to logits. Keeping the two apart lets the final exit attach a
    confidence head to the pre-logit features without pooling twice.
    """

    def __init__(self, pool: nn.Module, fc: nn.Module, num_features: int):
        super().__init__()
        self.pool = pool
        self.fc = fc
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def global_pool() -> nn.Module:
    """Global average pooling to a flat vector (an ``AdaptiveAvgPool2d``, which fvcore counts)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class StagedBackbone(nn.Module):
    """Base class: ``stem``, ``stages`` (a ``ModuleList``), ``head`` and ``stage_info``.

    Subclasses build the three parts and call :meth:`_finish`. ``forward`` runs
    ``head(stages(stem(x)))`` and is the plain backbone without exits.
    """

    stem: nn.Module
    stages: nn.ModuleList
    head: ClassifierHead

    def __init__(self, num_classes: int, in_chans: int, default_input_size: tuple[int, int, int]):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = tuple(default_input_size)
        self.stage_info: list[StageInfo] = []

    def _finish(self, stem: nn.Module, stages: list[nn.Module], head: ClassifierHead,
                channels: list[int], strides: list[int], stem_reduction: int) -> None:
        if not (len(stages) == len(channels) == len(strides)):
            raise ValueError("stages, channels and strides must have the same length")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        reduction = stem_reduction
        info = []
        for i, (c, s) in enumerate(zip(channels, strides)):
            reduction *= s
            info.append(StageInfo(name=f"stages.{i}", channels=c, stride=s, reduction=reduction))
        self.stage_info = info

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_features(self) -> int:
        return self.head.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def stage_shapes(self, input_size: tuple[int, int, int] | None = None) -> list[tuple[int, ...]]:
        """Output shape ``(C, H, W)`` of every stage for one input of ``input_size``."""
        input_size = tuple(input_size or self.default_input_size)
        was_training = self.training
        self.eval()
        try:
            x = torch.zeros(1, *input_size)
            x = self.stem(x)
            shapes = []
            for stage in self.stages:
                x = stage(x)
                shapes.append(tuple(x.shape[1:]))
        finally:
            self.train(was_training)
        return shapes
