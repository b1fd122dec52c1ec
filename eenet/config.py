"""eenet's Hydra configuration: where it lives, how it is composed, how it is instantiated.

The config groups ship inside the package (``eenet/conf``, found through
Hydra's ``pkg://eenet.conf`` search path), so an installed eenet runs from any
folder. Users add groups of their own from a folder of theirs with
``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``.

Instantiation goes through :func:`instantiate`. A configuration composed from the
user's own command line may name any ``_target_`` (it is the user's code). A
configuration read from a run folder is data someone may have sent: with
``trusted=False`` every ``_target_`` in it must be one of :data:`ALLOWED_TARGETS`
(eenet's own builders and the torch / Lightning classes its configs use), so a
``config.yaml`` naming ``numpy.load``, ``torch.load``, ``builtins.open`` or any
other callable is refused before anything runs.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Collection, Iterable

from omegaconf import DictConfig, ListConfig, open_dict

from eenet.errors import EENetError

CONFIG_MODULE = "eenet.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"

# Every callable a run folder's config.yaml may name (see the module docstring).
ALLOWED_TARGETS = frozenset({
    "eenet.data.ClassificationDataModule",
    "eenet.data.datamodule.ClassificationDataModule",
    "eenet.models.create_backbone",
    "eenet.models.registry.create_backbone",
    "eenet.models.ExitBlock",
    "eenet.models.exits.ExitBlock",
    "eenet.models.trecx.TRecXExit",
    "eenet.losses.EENetLoss",
    "eenet.losses.ExitDistillation",
    "eenet.losses.MultiExitCE",
    "eenet.losses.SumLoss",
    "eenet.losses.TwoStageLoss",
    "eenet.reporting.wandb.wandb_logger",
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.SGD",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.OneCycleLR",
    "lightning.Trainer",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.strategies.DDPStrategy",
})


def config_dir() -> Path:
    """The folder of eenet's own config groups (inside the installed package)."""
    return Path(str(resources.files(CONFIG_MODULE)))


def compose_config(overrides: Iterable[str] = (), output_dir: str | None = None,
                   config_name: str = "train", config_dirs: Iterable[str] = ()) -> DictConfig:
    """``<config_name>.yaml`` composed with ``overrides``, outside ``@hydra.main``.

    For tests, experiment scripts and users' own code that call the jobs
    (:func:`eenet.jobs.train.train`) directly. Hydra's runtime folder does not
    exist there, so ``output_dir`` is required unless an override sets it.
    ``config_dirs`` are folders of the user's own config groups, searched
    before eenet's.
    """
    from hydra import compose, initialize_config_module

    overrides = list(overrides)
    extra = [str(Path(d).resolve()) for d in config_dirs]
    if extra:
        paths = ",".join(f"file://{d}" for d in extra)
        overrides.append(f"hydra.searchpath=[{paths}]")
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


def _targets(node: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    """Every ``(path, _target_)`` inside a config node, nested ones included."""
    if isinstance(node, (DictConfig, dict)):
        for key, value in node.items():
            if key == "_target_":
                yield path or "<root>", value
            else:
                yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def check_targets(node: Any, where: str, allowed: Collection[str] = ALLOWED_TARGETS,
                  path: str = "") -> None:
    """Refuse any ``_target_`` in ``node`` outside ``allowed`` (one line naming its place).

    Args:
        node: a config node (nested dicts and lists are searched).
        where: what is checked, for the message (a file, a section).
        allowed: the callables that may be named; :data:`ALLOWED_TARGETS` by default.
        path: the node's own place in the config, prefixed to the places in messages.
    """
    for place, target in _targets(node, path):
        if not isinstance(target, str) or target not in allowed:
            raise EENetError(f"{where}: {place}._target_ '{target}' is not one of the classes "
                             f"eenet allows there; a run folder's config is data and cannot name "
                             f"code to run")


def instantiate(node, what: str, trusted: bool = True, **kwargs):
    """``hydra.utils.instantiate`` with eenet's errors turned back into one-line EENetErrors.

    Args:
        node: the config node.
        what: what it builds (for messages).
        trusted: False for a config read from a folder: every ``_target_`` must be
            in :data:`ALLOWED_TARGETS`, checked before anything is called.
        **kwargs: passed to ``instantiate``.
    """
    from hydra.utils import instantiate as hydra_instantiate

    if not trusted:
        check_targets(node, what)
    try:
        return hydra_instantiate(node, **kwargs)
    except Exception as exc:  # Hydra wraps constructor errors in InstantiationException
        cause = exc
        while cause is not None and not isinstance(cause, EENetError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise EENetError(str(cause)) from exc
        raise


def _user_config_dirs(argv: list[str]) -> list[Path] | None:
    """Folders the command line adds to the search path; None when one cannot be checked."""
    dirs: list[Path] = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.startswith(("hydra.searchpath=", "+hydra.searchpath=")):
            for item in arg.split("=", 1)[1].strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    dirs.append(Path(item[len("file://"):]))
                elif item:
                    return None  # a pkg:// path of the user's: let Hydra decide
    return dirs


def check_command_line(argv: list[str]) -> None:
    """One-line errors for the mistakes Hydra reports over several lines.

    - ``--config-dir DIR`` that is not a folder;
    - ``group=option`` when no searched folder holds ``<group>/<option>.yaml``.

    ``HYDRA_FULL_ERROR=1`` skips the check (Hydra then reports it itself).
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    extra = _user_config_dirs(argv)
    if extra is None:
        return
    for d in extra:
        if not d.is_dir():
            _fail(f"config folder {d} does not exist")
    roots = [*extra, config_dir()]
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        groups = [r / key for r in roots if (r / key).is_dir()]
        if "." in key or "/" in key or not groups or "," in value or value in ("null", ""):
            continue
        if not any((g / f"{value}.yaml").is_file() for g in groups):
            accepted = sorted({p.stem for g in groups for p in g.glob("*.yaml")})
            _fail(f"unknown {key} '{value}'; accepted: {', '.join(accepted)}")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
