"""Fold BatchNorm into the convolution before it, for inference.

In eval mode a BatchNorm after a convolution is an affine map per channel, so
it can be merged into the convolution's weights and bias:
w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta. The
folded network computes the same function (to float rounding) with one pass
over the activations less per convolution, which matters most where
activations are largest: the early, full-resolution layers that early exits
run. The static and the dynamic path share the folded modules.

Only the modules the engine calls are rewritten (the stem, each stage, each
exit's pre-block), so ``segments()`` and the exits' heads keep working; a
module that ``torch.fx`` cannot trace is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from eenet.models.early_exit import EarlyExitNetwork
from eenet.models.staged import StagedBackbone


def _count_bn(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def _fold_module(m: nn.Module) -> nn.Module:
    if _count_bn(m) == 0:
        return m
    try:
        return fuse(m, inplace=True)
    except Exception:  # not traceable by torch.fx: keep the module unfolded
        return m


def _fold_backbone(b: StagedBackbone) -> None:
    b.stem = _fold_module(b.stem)
    for k in range(len(b.stages)):
        b.stages[k] = _fold_module(b.stages[k])


def fold_batchnorm(net: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``net`` with Conv-BatchNorm pairs folded; ``(copy, pairs folded)``.

    ``net`` is an :class:`EarlyExitNetwork` or a :class:`StagedBackbone`; it is
    not changed. The copy is for inference only (its ``state_dict`` keys differ).
    """
    if not isinstance(net, (EarlyExitNetwork, StagedBackbone)):
        raise TypeError(f"fold_batchnorm takes an EarlyExitNetwork or a StagedBackbone, "
                        f"not {type(net).__name__}")
    out = copy.deepcopy(net).eval()
    before = _count_bn(out)
    with torch.no_grad():
        if isinstance(out, EarlyExitNetwork):
            _fold_backbone(out.backbone)
            for e in out.exits:
                if hasattr(e, "pre"):
                    e.pre = _fold_module(e.pre)
        else:
            _fold_backbone(out)
    return out, before - _count_bn(out)
