"""Run folders: building a network from a config, and loading a finished run.

A run folder written by ``eenet-train`` holds ``config.yaml``, ``model.pt``
(a plain ``state_dict``), ``cost.json`` and ``results.json``. Whoever sent the
folder, loading it (:func:`load_run`, behind ``eenet-eval`` and ``eenet-export``)
runs no code of theirs and writes nothing:

- ``config.yaml`` is data. eenet-train writes it resolved, so a ``${...}``
  interpolation (which could read the environment) or a ``???`` is refused;
  every ``_target_`` in it must be one of :data:`eenet.config.ALLOWED_TARGETS`,
  and the three parts that are built from it (:data:`RUN_BUILDS`: the data
  module, the backbone, the exit block) may each name only their own class, at
  their own root, nothing nested. All of it is checked before anything is built.
- ``model.pt`` is read with ``torch.load(..., weights_only=True)``
  (:func:`eenet.io.safe_torch_load`), which rebuilds tensors only; it holds the
  whole network, so ``backbone.checkpoint`` (the file a post-trained run started
  from) is not read again.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from eenet.build import build_early_exit_network
from eenet.config import check_targets, instantiate
from eenet.cost import CostTable, exit_cost_table
from eenet.errors import EENetError
from eenet.io import first_line, safe_torch_load
from eenet.models.early_exit import EarlyExitNetwork, load_state_dict_checked
from eenet.reporting.results import check_results_file

RUN_FILES = ("config.yaml", "model.pt")

#: What :func:`load_run` builds from a run folder's config, and the only callables each
#: part may name (at its root; no ``_target_`` may be nested inside it).
RUN_BUILDS = {
    "dataset.datamodule": frozenset({"eenet.data.ClassificationDataModule",
                                     "eenet.data.datamodule.ClassificationDataModule"}),
    "backbone": frozenset({"eenet.models.create_backbone",
                           "eenet.models.registry.create_backbone"}),
    "exit": frozenset({"eenet.models.ExitBlock", "eenet.models.exits.ExitBlock",
                       "eenet.models.trecx.TRecXExit"}),
}


def build_network(cfg: DictConfig, input_size: tuple[int, int, int],
                  stages: list[int] | None = None, trusted: bool = True) -> EarlyExitNetwork:
    """Backbone + exit block + placement from the config (or at the given ``stages``).

    ``backbone.checkpoint`` (a run folder, its model.pt or a backbone state_dict) is
    loaded into the backbone before the exits are attached. ``trusted=False`` for a
    config read from a folder (see :func:`eenet.config.instantiate`).
    """
    backbone = instantiate(cfg.backbone, "backbone", trusted=trusted)
    exit_block = instantiate(cfg.exit, "exit", trusted=trusted)
    p = cfg.placement
    mitigation = cfg.get("mitigation")
    if stages is not None:
        return build_early_exit_network(backbone, exit_block, placement="explicit", stages=stages,
                                        input_size=input_size, mitigation=mitigation)
    stages = list(p.stages) if p.get("stages") is not None else None
    return build_early_exit_network(backbone, exit_block, placement=p.method,
                                    num_exits=int(p.num_exits), stages=stages,
                                    input_size=input_size, mitigation=mitigation)


def check_output_dir(out_dir: Path) -> None:
    """The output folder can be created and written to (checked before anything is written)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".eenet-write-check-"):
            pass
    except OSError as exc:
        raise EENetError(f"output folder {out_dir} is not writable: {exc.strerror or exc}") from exc


def read_run_config(run_dir: str | Path) -> DictConfig:
    """A finished run's ``config.yaml``, checked to be one (both run files present)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise EENetError(f"{run_dir} is not a finished eenet-train run: {name} is missing")
    check_results_file(run_dir)  # a run written by a newer eenet is refused, not half-read
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
    except Exception as exc:  # YAML syntax, not a mapping
        raise EENetError(f"cannot read {run_dir / 'config.yaml'}: {first_line(exc)}") from exc
    if not isinstance(cfg, DictConfig):
        raise EENetError(f"{run_dir / 'config.yaml'} does not hold a mapping")
    return cfg


def _check_plain_data(node: DictConfig | ListConfig, where: str, path: str = "") -> None:
    """Refuse ``${...}`` interpolations and ``???`` anywhere in a run folder's config (one line)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        place = f"{path}[{key}]" if isinstance(node, ListConfig) else (
            f"{path}.{key}" if path else str(key))
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            raise EENetError(f"{where}: {place} is not a plain value (eenet-train writes "
                             f"config.yaml resolved; '${{...}}' and '???' are not accepted)")
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            _check_plain_data(value, where, place)


def check_run_folder(run_dir: str | Path) -> DictConfig:
    """A run folder's ``config.yaml``, checked as data before anything is built from it.

    Raises :class:`EENetError` (one line) unless the folder holds both run files, the
    config is plain data (no interpolation, no missing value), every ``_target_`` is in
    :data:`eenet.config.ALLOWED_TARGETS`, and each part of :data:`RUN_BUILDS` names
    only its own class, at its root. Reads nothing but ``config.yaml``.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    where = str(run_dir / "config.yaml")
    for key in ("dataset", "backbone", "exit", "placement"):
        if not isinstance(cfg.get(key), DictConfig):
            raise EENetError(f"{where} has no '{key}' section: not an eenet-train config")
    _check_plain_data(cfg, where)
    check_targets(cfg, where)  # any callable outside eenet's allow-list, anywhere
    for part, allowed in RUN_BUILDS.items():
        node = OmegaConf.select(cfg, part)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise EENetError(f"{where}: {part} names no _target_: not an eenet-train config")
        check_targets({"_target_": node._target_}, where, allowed, path=part)
        for key, value in node.items():  # nothing nested is built: no _target_ below the root
            if key != "_target_":
                check_targets(value, where, allowed=(), path=f"{part}.{key}")
    return cfg


def load_run(run_dir: str | Path, data_root: str | None = None
             ) -> tuple[DictConfig, Any, EarlyExitNetwork, CostTable]:
    """Rebuild a trained run: its config, data module (set up), network (eval mode) and costs.

    Nothing from the folder runs as code (see the module docstring): the whole
    config is checked by :func:`check_run_folder` before anything is built, and
    ``model.pt`` is read with ``weights_only=True``.

    Args:
        run_dir: a folder written by ``eenet-train``.
        data_root: where the data is now, if it moved since training.
    """
    run_dir = Path(run_dir)
    cfg = check_run_folder(run_dir)
    where = str(run_dir / "config.yaml")
    if data_root:
        old = str(cfg.get("data_root") or "")
        root = cfg.dataset.datamodule.get("root")
        if root and old and str(root).startswith(old):
            cfg.dataset.datamodule.root = str(Path(data_root).resolve()) + str(root)[len(old):]
        cfg.data_root = str(Path(data_root).resolve())
    datamodule = instantiate(cfg.dataset.datamodule, f"{where}: dataset", trusted=False)
    datamodule.setup("fit")
    datamodule.setup("test")
    input_size = tuple(datamodule.input_size)
    net_cfg = copy.deepcopy(cfg)  # model.pt holds the whole network, backbone included:
    net_cfg.backbone.checkpoint = None  # the file a post-trained run started from is not read
    net = build_network(net_cfg, input_size, trusted=False)
    weights = run_dir / "model.pt"
    state = safe_torch_load(weights, what="weights")
    load_state_dict_checked(net, state, what=str(weights))
    net.eval()
    return cfg, datamodule, net, exit_cost_table(net, input_size)
