"""Backbone registry: ``@register_backbone`` and ``create_backbone(name, **kw)`` (as in timm)."""

from __future__ import annotations

from typing import Callable

from eenet.errors import unknown_name
from eenet.models.staged import StagedBackbone

_BACKBONES: dict[str, Callable[..., StagedBackbone]] = {}


def register_backbone(fn: Callable[..., StagedBackbone]) -> Callable[..., StagedBackbone]:
    """Register a backbone constructor under its function name."""
    name = fn.__name__
    if name in _BACKBONES:
        raise ValueError(f"backbone '{name}' is registered twice")
    _BACKBONES[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_BACKBONES)


def create_backbone(name: str, checkpoint: str | None = None, **kwargs) -> StagedBackbone:
    """Build a registered backbone.

    Args:
        name: registered name, e.g. ``resnet20``.
        checkpoint: weights to start from: an eenet run folder, its ``model.pt``, or a
            backbone ``state_dict`` (read with ``weights_only=True``).
        **kwargs: passed to the constructor (``num_classes``, ``in_chans``, ...).
    """
    if name not in _BACKBONES:
        raise unknown_name("backbone", name, _BACKBONES)
    model = _BACKBONES[name](**kwargs)
    if checkpoint:
        from eenet.models.weights import load_backbone_weights

        load_backbone_weights(model, checkpoint)
    return model
