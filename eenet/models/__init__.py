"""Models: staged backbones (registry), exit blocks, exit placement, the early-exit network.

Plain PyTorch; nothing here knows about Lightning, Hydra or fvcore.
"""

from eenet.models import (  # noqa: F401  (registration)
    cifar_vgg_densenet, mlperf_tiny, resnet_cifar, torchvision_densenet, torchvision_mobilenet,
    torchvision_resnet, torchvision_vgg)
from eenet.models.early_exit import EarlyExitNetwork, ExitOutputs, load_state_dict_checked
from eenet.models.exits import ExitBlock
from eenet.models.placement import place_exits
from eenet.models.registry import create_backbone, list_backbones, register_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone, StageInfo

__all__ = [
    "ClassifierHead", "EarlyExitNetwork", "ExitBlock", "ExitOutputs", "StageInfo",
    "StagedBackbone", "create_backbone", "list_backbones", "load_state_dict_checked",
    "place_exits", "register_backbone",
]
