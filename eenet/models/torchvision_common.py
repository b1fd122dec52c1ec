"""Shared by the torchvision wrappers: load the model, resize its classifier, adapt its first conv.

The staged wrappers (:mod:`eenet.models.torchvision_resnet`, ``torchvision_vgg``,
``torchvision_densenet``, ``torchvision_mobilenet``) keep torchvision's own
modules, so these helpers only prepare the torchvision model before it is cut
into stages:

- :func:`load_torchvision_model`: build ``torchvision.models.<arch>`` with no
  weights or with a torchvision weights name (``"DEFAULT"``,
  ``"IMAGENET1K_V1"``, ...), downloaded by torchvision on first use; an unknown
  name or a failed download raises :class:`EENetError`. With weights and a
  different ``num_classes``, the last linear layer is replaced by a new one.
- :func:`adapt_first_conv`: a first convolution for ``in_chans`` input channels
  (pretrained filters are averaged over RGB and repeated, scaled by
  3 / in_chans, so a grey image repeated on every channel gives the same
  response), or a 3x3 stride-1 convolution for small images.
- :func:`chain_stride`: the stride of a stage whose strided layers form one chain.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from eenet.errors import EENetError


def weight_names(arch: str) -> list[str]:
    """Names torchvision accepts as ``weights`` for ``arch`` (``DEFAULT`` included)."""
    return list(torchvision.models.get_model_weights(arch).__members__)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (``"classifier.6"``) by ``module``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def load_torchvision_model(arch: str, weights: str | None, num_classes: int, classifier: str,
                           **kwargs) -> nn.Module:
    """``torchvision.models.<arch>``, with torchvision weights when ``weights`` is a name.

    Args:
        arch: torchvision constructor name (``resnet18``, ``vgg16_bn``, ...).
        weights: ``None`` (random init) or a torchvision weights name.
        num_classes: classifier outputs; with weights the last linear layer is
            replaced when its size differs.
        classifier: dotted path of that last linear layer (``fc``, ``classifier.6``).
        **kwargs: passed to the torchvision constructor.
    """
    ctor = getattr(torchvision.models, arch)
    if not weights:
        return ctor(weights=None, num_classes=num_classes, **kwargs)
    accepted = weight_names(arch)
    if str(weights).rpartition(".")[2] not in accepted:
        raise EENetError(f"unknown torchvision weights '{weights}' for {arch}; "
                         f"accepted: {', '.join(accepted)}")
    try:
        model = ctor(weights=weights, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise EENetError(f"could not load torchvision weights '{weights}' for {arch} "
                         "(they are downloaded on first use; is the network reachable?): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from exc
    except (KeyError, ValueError) as exc:
        raise EENetError(f"torchvision rejected weights '{weights}' for {arch}: {exc}") from exc
    fc = model.get_submodule(classifier)
    if num_classes != fc.out_features:
        set_submodule(model, classifier, nn.Linear(fc.in_features, num_classes))
    return model


def adapt_first_conv(model: nn.Module, path: str, in_chans: int, pretrained: bool,
                     small_input: bool = False) -> None:
    """Replace the first convolution (at ``path``) for ``in_chans`` channels or small images.

    Nothing changes when ``in_chans == 3`` and not ``small_input``. Otherwise the
    new convolution keeps the old one's output channels and bias setting; its
    geometry is the old one's, or 3x3 stride 1 padding 1 with ``small_input``.
    With ``pretrained`` and the old geometry, the filters are the old ones
    averaged over the input channels and repeated ``in_chans`` times, times
    3 / in_chans (the bias is copied); a small-input convolution starts from
    PyTorch's default initialisation.
    """
    if in_chans == 3 and not small_input:
        return
    if in_chans < 1:
        raise EENetError(f"in_chans must be >= 1, got {in_chans}")
    old = model.get_submodule(path)
    k, s, p = (3, 1, 1) if small_input else (old.kernel_size, old.stride, old.padding)
    conv = nn.Conv2d(in_chans, old.out_channels, k, s, p, bias=old.bias is not None)
    if pretrained and not small_input:
        with torch.no_grad():  # keep pretrained filters: average over RGB, repeat per channel
            conv.weight.copy_(old.weight.mean(1, keepdim=True).repeat(1, in_chans, 1, 1)
                              * (3.0 / in_chans))
            if old.bias is not None:
                conv.bias.copy_(old.bias)
    set_submodule(model, path, conv)


def chain_stride(module: nn.Module) -> int:
    """Product of the strides of every convolution and pooling layer in ``module``.

    Right for a stage whose strided layers run one after another (VGG layers,
    dense blocks and transitions, inverted residual blocks); not for parallel
    strided branches such as a ResNet block and its downsampling shortcut.
    """
    stride = 1
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            s = m.stride
            stride *= int(s[0] if isinstance(s, tuple) else s)
    return stride


def default_hw(input_size: tuple[int, int] | None, small_input: bool) -> tuple[int, int]:
    """The default input height and width: the given one, 32x32 for small inputs, else 224x224."""
    if input_size:
        return tuple(int(v) for v in input_size)
    return (32, 32) if small_input else (224, 224)
