"""Run folders: building a network from a config, and loading a finished run.

A run folder written by ``eenet-train`` holds ``config.yaml``, ``model.pt``
(a plain ``state_dict``), ``cost.json`` and ``results.json``. Whoever sent the
folder, loading it runs no code of theirs: the config's ``_target_`` entries
must be eenet's own allowed classes (:data:`eenet.config.ALLOWED_TARGETS`) and
the weights are read with ``weights_only=True``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eenet.build import build_early_exit_network
from eenet.config import check_targets, instantiate
from eenet.cost import CostTable, exit_cost_table
from eenet.errors import EENetError
from eenet.io import first_line, safe_torch_load
from eenet.models.early_exit import EarlyExitNetwork, load_state_dict_checked

RUN_FILES = ("config.yaml", "model.pt")


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
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
    except Exception as exc:  # YAML syntax, not a mapping
        raise EENetError(f"cannot read {run_dir / 'config.yaml'}: {first_line(exc)}") from exc
    if not isinstance(cfg, DictConfig):
        raise EENetError(f"{run_dir / 'config.yaml'} does not hold a mapping")
    return cfg


def load_run(run_dir: str | Path, data_root: str | None = None
             ) -> tuple[DictConfig, Any, EarlyExitNetwork, CostTable]:
    """Rebuild a trained run: its config, data module (set up), network (eval mode) and costs.

    Nothing from the folder runs as code: ``_target_`` entries are checked against
    eenet's allow-list before anything is built, and ``model.pt`` is read with
    ``weights_only=True``.

    Args:
        run_dir: a folder written by ``eenet-train``.
        data_root: where the data is now, if it moved since training.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    where = str(run_dir / "config.yaml")
    for key in ("dataset", "backbone", "exit", "placement"):
        if not isinstance(cfg.get(key), DictConfig):
            raise EENetError(f"{where} has no '{key}' section: not an eenet-train config")
    if data_root:
        old = str(cfg.get("data_root") or "")
        root = cfg.dataset.datamodule.get("root")
        if root and old and str(root).startswith(old):
            cfg.dataset.datamodule.root = str(Path(data_root).resolve()) + str(root)[len(old):]
        cfg.data_root = str(Path(data_root).resolve())
    check_targets(cfg, where)  # every _target_ of the folder's config, before anything is built
    datamodule = instantiate(cfg.dataset.datamodule, f"{where}: dataset", trusted=False)
    datamodule.setup("fit")
    datamodule.setup("test")
    input_size = tuple(datamodule.input_size)
    net = build_network(cfg, input_size, trusted=False)
    weights = run_dir / "model.pt"
    state = safe_torch_load(weights, what="weights")
    load_state_dict_checked(net, state, what=str(weights))
    net.eval()
    return cfg, datamodule, net, exit_cost_table(net, input_size)
