"""eenet: early-exit neural networks on PyTorch, Lightning and Hydra.

Layers, bottom to top (nothing imports upward; ``tests/test_layout.py`` checks it):

- ``eenet.errors``, ``eenet.io``: one-line errors; atomic writes and safe loading;
- ``eenet.models``: staged backbones, exit blocks, placement, the early-exit network;
- ``eenet.cost``, ``eenet.losses``, ``eenet.policies``, ``eenet.build``: fvcore MAC
  tables, the training losses, exit policies, assembling a network;
- ``eenet.inference``: the dynamic engine (real per-sample early exit), latency;
- ``eenet.calibration``: threshold search on cached validation outputs;
- ``eenet.export``: ONNX segments and their standalone runner;
- ``eenet.data``, ``eenet.training``, ``eenet.reporting``: Lightning data and
  training modules, results files, plots, W&B;
- ``eenet.config``, ``eenet.runs``, ``eenet.jobs``: Hydra configs (shipped in
  ``eenet/conf``), run folders, the train / evaluate / export jobs;
- ``eenet.cli``: the commands, the only place with ``@hydra.main``.

The public API is importable from the package top (loaded on first use)::

    from eenet import compose_config, train, load_run, Calibrator, DynamicEngine
"""

from __future__ import annotations

import importlib
from typing import Any

from eenet.errors import EENetError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use, so ``import eenet`` is light)
_API = {
    # networks
    "create_backbone": "eenet.models",
    "list_backbones": "eenet.models",
    "register_backbone": "eenet.models",
    "StagedBackbone": "eenet.models",
    "ExitBlock": "eenet.models",
    "EarlyExitNetwork": "eenet.models",
    "build_early_exit_network": "eenet.build",
    "attach_exits": "eenet.build",
    "exit_cost_table": "eenet.cost",
    "CostTable": "eenet.cost",
    # training losses and exit policies
    "EENetLoss": "eenet.losses",
    "MultiExitCE": "eenet.losses",
    "TwoStageLoss": "eenet.losses",
    "create_policy": "eenet.policies",
    # thresholds and real early exit
    "cache_exit_outputs": "eenet.calibration",
    "Calibrator": "eenet.calibration",
    "DynamicEngine": "eenet.inference",
    "export_segments": "eenet.export",
    # configs, run folders and jobs
    "compose_config": "eenet.config",
    "build_network": "eenet.runs",
    "load_run": "eenet.runs",
    "train": "eenet.jobs.train",
    "evaluate": "eenet.jobs.evaluate",
    "export_run": "eenet.jobs.export",
}

__all__ = ["EENetError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'eenet' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
