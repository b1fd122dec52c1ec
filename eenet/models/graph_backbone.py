"""Model sources for exits on a traced graph: torchvision and timm by name, any module.

What ``backbone=torchvision``, ``backbone=timm`` and ``backbone=graph`` build: a
:class:`GraphBackbone`, the model plus where its exits go (``exits_at``: node
names, or None for placement by MACs among its block outputs). ``eenet.build``
cuts it into segments (:mod:`eenet.models.graph_split`).

``pretrained=true`` asks torchvision or timm for the published weights; when they
cannot be fetched (no network) it fails at once with one line naming them.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from eenet.errors import EENetError
from eenet.models.graph_split import TOKEN_POOLS


@dataclass
class GraphBackbone:
    """A model to cut into segments, and where its exits go.

    Attributes:
        model: the model (one input tensor, one (B, K) output).
        name: what it is called in results (``resnet18``, ``my_pkg.MyNet``).
        exits_at: node names the exits read, or None: placement by MACs among
            :func:`eenet.models.graph_split.block_outputs` (``placement.*``).
        tokens: ``mean`` or ``cls``, how exits on token sequences pool.
    """

    model: nn.Module
    name: str
    exits_at: list[str] | None = None
    tokens: str = "mean"
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        return self.info.get("num_classes")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _finish(model: nn.Module, name: str, exits_at, tokens: str, checkpoint: str | None,
            num_classes: int | None) -> GraphBackbone:
    if tokens not in TOKEN_POOLS:
        raise EENetError(f"backbone.tokens='{tokens}' is not accepted; accepted: "
                         f"{', '.join(TOKEN_POOLS)}")
    if exits_at is not None:
        if isinstance(exits_at, str) or not all(isinstance(a, str) for a in exits_at):
            raise EENetError(f"backbone.exits_at must be a list of node names, got {exits_at!r}")
        exits_at = [str(a) for a in exits_at]
    if checkpoint:
        from eenet.models.weights import load_backbone_weights

        load_backbone_weights(model, checkpoint)
    return GraphBackbone(model, name, exits_at, tokens, {"num_classes": num_classes})


def torchvision_backbone(name: str, num_classes: int, in_chans: int = 3,
                         exits_at: Sequence[str] | None = None, tokens: str = "mean",
                         pretrained: bool = False, checkpoint: str | None = None,
                         kwargs: dict | None = None, **_ignored) -> GraphBackbone:
    """A torchvision classification model by name (``torchvision.models.get_model``).

    Args:
        name: e.g. ``resnet18``, ``mobilenet_v3_small``, ``vit_b_16``.
        num_classes: classifier outputs.
        in_chans: must be 3 (torchvision's models read RGB images).
        exits_at: node names, or None for placement by MACs.
        tokens: ``mean`` or ``cls`` for exits on token sequences.
        pretrained: load torchvision's DEFAULT weights (downloaded; then num_classes must
            be the weights' own).
        checkpoint: weights to start from (an eenet run folder, its model.pt, a state_dict).
        kwargs: more constructor arguments (e.g. ``{image_size: 32}`` for a ViT).
    """
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
        raise EENetError(f"unknown torchvision model '{name}'; nearest: {', '.join(close) or '-'} "
                         "(torchvision.models.list_models() lists them)")
    if in_chans != 3:
        raise EENetError(f"torchvision's {name} reads 3-channel images, the data set has "
                         f"{in_chans}; use a data set with 3 channels, backbone=timm (in_chans), "
                         "or a backbone of eenet's registry")
    kw = dict(kwargs or {})
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):  # torch.hub's progress lines
                model = torchvision.models.get_model(name, weights=weights, **kw)
        except Exception as exc:
            raise EENetError(f"pretrained weights {weights} for torchvision {name} could not be "
                             f"fetched ({_first_line(exc)}); give backbone.pretrained=false or "
                             "backbone.checkpoint=<state_dict file>") from exc
        out = len(weights.meta.get("categories") or []) or None
        if out is not None and out != num_classes:
            raise EENetError(f"{weights} has {out} classes, the data set {num_classes}; exits on a "
                             "pretrained model keep its classifier")
    else:
        try:
            model = torchvision.models.get_model(name, num_classes=num_classes, **kw)
        except TypeError as exc:
            raise EENetError(f"torchvision {name}: {_first_line(exc)} (backbone.kwargs)") from exc
    return _finish(model, name, exits_at, tokens, checkpoint, num_classes)


def _reachable_or_fail(name: str) -> None:
    """Fail at once, naming the weights, when timm's weights host cannot be resolved
    (huggingface_hub would otherwise retry for a minute before giving up)."""
    import socket
    from urllib.parse import urlparse

    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None)
    what = hub or url or name
    host = "huggingface.co" if hub else (urlparse(url).hostname if url else None)
    if host is None:
        raise EENetError(f"timm {name} has no published weights; give backbone.pretrained=false")
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise EENetError(f"pretrained weights {what} for timm {name} could not be fetched "
                         f"({host}: {_first_line(exc)}); give backbone.pretrained=false or "
                         "backbone.checkpoint=<state_dict file>") from exc


def timm_backbone(name: str, num_classes: int, in_chans: int = 3,
                  exits_at: Sequence[str] | None = None, tokens: str = "mean",
                  pretrained: bool = False, checkpoint: str | None = None,
                  kwargs: dict | None = None, **_ignored) -> GraphBackbone:
    """A timm model by name (``timm.create_model``); arguments as :func:`torchvision_backbone`,
    with ``in_chans`` passed to timm."""
    try:
        import timm
    except ImportError as exc:
        raise EENetError("backbone=timm needs the timm package: pip install -c constraints.txt "
                         "timm") from exc
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise EENetError(f"unknown timm model '{name}'; nearest: {', '.join(close) or '-'} "
                         "(timm.list_models('pattern*') lists them)")
    kw = dict(kwargs or {})
    if pretrained:
        _reachable_or_fail(name)
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes,
                                  in_chans=in_chans, **kw)
    except Exception as exc:
        if pretrained:
            raise EENetError(f"pretrained weights for timm {name} could not be fetched "
                             f"({_first_line(exc)}); give backbone.pretrained=false or "
                             "backbone.checkpoint=<state_dict file>") from exc
        raise EENetError(f"timm {name}: {_first_line(exc)} (backbone.kwargs)") from exc
    return _finish(model, name, exits_at, tokens, checkpoint, num_classes)


def graph_backbone(model: nn.Module, name: str | None = None, num_classes: int | None = None,
                   exits_at: Sequence[str] | None = None, tokens: str = "mean",
                   pretrained: bool = False, checkpoint: str | None = None,
                   **_ignored) -> GraphBackbone:
    """Any model, built by the config (``backbone.model._target_=my_pkg.MyNet``)."""
    if not isinstance(model, nn.Module):
        raise EENetError(f"backbone.model must build a torch.nn.Module, got {type(model).__name__}")
    if pretrained:
        raise EENetError("backbone.pretrained applies to torchvision and timm models; load your "
                         "model's weights with backbone.checkpoint=<state_dict file>")
    return _finish(model, name or type(model).__name__, exits_at, tokens, checkpoint, num_classes)
