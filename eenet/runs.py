"""Run folders: building a network from a config, and loading a finished run.

A run folder written by ``eenet-train`` holds ``config.yaml``, ``model.pt``
(a plain ``state_dict``), ``cost.json`` and ``results.json`` (written last; while the
run is incomplete an ``INCOMPLETE`` marker is there, see :mod:`eenet.run_folder`, and
``resume=true`` continues it: :func:`check_resume_config`). Whoever sent the
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
import re
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
from eenet.run_folder import MARKER, read_marker

RUN_FILES = ("config.yaml", "model.pt")

#: What :func:`load_run` builds from a run folder's config, and the only callables each
#: part may name (at its root; no ``_target_`` may be nested inside it).
RUN_BUILDS = {
    "dataset.datamodule": frozenset({"eenet.data.ClassificationDataModule",
                                     "eenet.data.datamodule.ClassificationDataModule"}),
    "backbone": frozenset({"eenet.models.create_backbone", "eenet.models.registry.create_backbone",
                           "eenet.models.graph_backbone.torchvision_backbone",
                           "eenet.models.graph_backbone.timm_backbone",
                           "eenet.models.graph_backbone.graph_backbone"}),
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


#: Settings a run continued with ``resume=true`` may change: where things are, how
#: the run is shown and logged, what is computed after training, on what hardware, and
#: how many epochs it runs (and a value that only follows one of them, such as
#: ``scheduler.T_max: ${trainer.max_epochs}``). Everything else must be the folder's
#: own ``config.yaml``.
RESUME_MAY_DIFFER = ("resume", "ckpt_path", "overwrite", "threads", "channels_last", "output_dir",
                     "data_root",
                     "dataset.datamodule.root", "dataset.datamodule.download",
                     "dataset.datamodule.num_workers", "logger", "anytime", "objective_budget",
                     "trainer.max_epochs", "trainer.enable_progress_bar",
                     "trainer.enable_model_summary", "trainer.log_every_n_steps",
                     "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                     "trainer.precision")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _short(value: Any) -> str:
    text = "absent" if value is _ABSENT else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ABSENT = object()


def check_resume_config(cfg: DictConfig, run_dir: str | Path) -> None:
    """``resume=true`` continues the run in ``run_dir``: refuse (one line) a configuration that
    differs from the folder's ``config.yaml`` in anything but :data:`RESUME_MAY_DIFFER`."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        raise EENetError(f"resume=true but {saved_file} does not exist, so the run to continue "
                         f"is unknown; start it again in a new folder or give overwrite=true")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    except Exception as exc:
        raise EENetError(f"cannot read {saved_file}: {first_line(exc)}") from exc
    if not isinstance(saved, dict):
        raise EENetError(f"{saved_file} does not hold a mapping")
    now, then = _flat(OmegaConf.to_container(cfg, resolve=True)), _flat(saved)

    def free(key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in RESUME_MAY_DIFFER)

    def follows_free(key: str) -> bool:  # e.g. scheduler.T_max: ${trainer.max_epochs}
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node \
                or not OmegaConf.is_interpolation(node, leaf):
            return False
        refs = re.findall(r"\$\{([^}:]+)\}", str(OmegaConf.to_container(node)[leaf]))
        return bool(refs) and all(free(r) for r in refs)

    differ = [k for k in sorted(set(now) | set(then))
              if now.get(k, _ABSENT) != then.get(k, _ABSENT) and not free(k)
              and not follows_free(k)]
    if differ:
        shown = "; ".join(f"{k}: {_short(now.get(k, _ABSENT))} here, {_short(then.get(k, _ABSENT))} "
                          f"in the run" for k in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise EENetError(f"resume=true continues the run in {run_dir}, but this configuration "
                         f"differs from its config.yaml: {shown}{more}; resume with the run's own "
                         f"settings (trainer.max_epochs, threads, data_root, logger, devices and "
                         f"the like may change: eenet.runs.RESUME_MAY_DIFFER), or start a new run "
                         f"in another folder (or overwrite=true)")
    if (then.get("scheduler._target_") == "torch.optim.lr_scheduler.OneCycleLR"
            and now.get("trainer.max_epochs") != then.get("trainer.max_epochs")):
        raise EENetError(f"resume=true continues the run in {run_dir}, whose one-cycle schedule "
                         f"was laid over its trainer.max_epochs={then.get('trainer.max_epochs')} "
                         f"when it started; resume it with that trainer.max_epochs (a one-cycle "
                         f"run cannot be lengthened), or start a new run in another folder")


def read_run_config(run_dir: str | Path) -> DictConfig:
    """A finished run's ``config.yaml``, checked to be one (both run files present)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise EENetError(f"{run_dir} is not a finished eenet-train run: {name} is missing")
    if (run_dir / MARKER).exists():
        job = read_marker(run_dir).get("job", "eenet-train")
        raise EENetError(f"{run_dir} is not a finished run: {MARKER} is there ({job} is writing "
                         f"it, or stopped before it finished); let it finish, or continue it: "
                         f"eenet-train resume=true hydra.run.dir={run_dir}")
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
    if net_cfg.backbone.get("pretrained"):  # nor published weights fetched again: model.pt has them
        net_cfg.backbone.pretrained = False
    net = build_network(net_cfg, input_size, trusted=False)
    weights = run_dir / "model.pt"
    state = safe_torch_load(weights, what="weights")
    load_state_dict_checked(net, state, what=str(weights))
    net.eval()
    return cfg, datamodule, net, exit_cost_table(net, input_size)
