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

import contextlib
import io
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
    # models cut at graph nodes (eenet.models.graph_backbone): torchvision and timm models are
    # named by a string; graph_backbone's own model (backbone.model._target_, the user's class)
    # is a nested _target_ that this list does not hold, so a run folder cannot name it
    "eenet.models.graph_backbone.torchvision_backbone",
    "eenet.models.graph_backbone.timm_backbone",
    "eenet.models.graph_backbone.graph_backbone",
    "eenet.losses.EENetLoss",
    "eenet.losses.ExitDistillation",
    "eenet.losses.MultiExitCE",
    "eenet.losses.SumLoss",
    "eenet.losses.TwoStageLoss",
    "eenet.reporting.wandb.wandb_logger",
    "eenet.reporting.csv_log.RunCSVLogger",
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.SGD",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.OneCycleLR",
    "lightning.Trainer",
    "lightning.pytorch.loggers.CSVLogger",  # the csv logger of run folders made before RunCSVLogger
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
    after eenet's (Hydra's order), so :func:`check_config_dirs` refuses a file in
    them that has the name of one of eenet's.
    """
    from hydra import compose, initialize_config_module

    overrides = list(overrides)
    extra = [str(Path(d).resolve()) for d in config_dirs]
    check_config_dirs(extra)
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


def _parse_command_line(argv: list[str]) -> Any | None:
    """``argv`` read by Hydra's own parser, as ``@hydra.main`` reads it; None when it refuses it.

    Hydra then reports the mistake itself (argparse's usage line and error); also None
    when this Hydra version has no ``get_args_parser`` (nothing is checked then).
    """
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_args(argv)
    except SystemExit:
        return None


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _user_config_dirs(args: Any) -> list[Path]:
    """Folders the command line adds to Hydra's search path, as it gives them.

    ``--config-dir DIR`` and the folders of ``hydra.searchpath=[...]``: ``file://DIR``
    or a plain ``DIR`` (Hydra reads both as folders), and ``pkg://package``, which must
    be importable.
    """
    dirs: list[Path] = []
    if args.config_dir is not None:
        dirs.append(Path(args.config_dir))
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lstrip("+") != "hydra.searchpath":
            continue
        for item in value.strip().strip("[]").split(","):
            item = _unquote(item)
            scheme, sep, path = item.partition("://")
            if not item:
                continue
            if not sep:
                dirs.append(Path(item))
            elif scheme == "file":
                dirs.append(Path(path))
            elif scheme == "pkg":
                try:
                    dirs.append(Path(str(resources.files(path.replace("/", ".")))))
                except (ImportError, TypeError) as exc:
                    raise EENetError(f"config package {path} of hydra.searchpath cannot be "
                                     f"imported: {exc}") from None
    return dirs


def check_config_dirs(dirs: Iterable[str | Path]) -> None:
    """Refuse a user's config folder that is missing, or holds a file Hydra would ignore.

    Hydra searches eenet's own configs first and a user's folders (``--config-dir``,
    ``hydra.searchpath``) after them, so ``DIR/backbone/resnet20.yaml`` would never be
    read: eenet's ``backbone/resnet20.yaml`` wins, silently. Such a file is refused
    unless it is an unchanged copy of eenet's (nothing of the user's is then lost).

    Raises:
        EENetError: one line naming the folder or the file.
    """
    own = config_dir()
    builtins = sorted(own.rglob("*.yaml"))
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise EENetError(f"config folder {folder} does not exist")
        if folder.resolve() == own.resolve():
            continue
        for builtin in builtins:
            rel = builtin.relative_to(own)
            mine = folder / rel
            if mine.is_file() and mine.read_bytes() != builtin.read_bytes():
                name = rel.with_suffix("").as_posix()
                raise EENetError(
                    f"{mine} has the name of eenet's own config {name}.yaml, which Hydra reads "
                    f"first, so yours would be ignored; give it a name of its own (e.g. "
                    f"{(rel.parent / ('my_' + rel.name)).as_posix()})")


def _options(value: str) -> list[str]:
    """The config options a group override names: one, or a comma-separated sweep.

    Empty for what only Hydra can read: ``null``, interpolations, ``choice(...)``,
    ``glob(...)``, ``range(...)``, lists.
    """
    if any(c in value for c in "()[]{}$*?"):
        return []
    options = [_unquote(v) for v in value.split(",")]
    return [o for o in options if o and o != "null"]


def check_command_line(argv: list[str]) -> None:
    """Refuse, before Hydra starts, the mistakes Hydra reports over many lines or not at all.

    - a user's config folder (``--config-dir DIR``, ``hydra.searchpath=[file://DIR]``)
      that does not exist, or that holds a file named like one of eenet's
      (:func:`check_config_dirs`);
    - ``group=option`` (each option of a sweep ``group=a,b``) when no searched folder
      holds ``<group>/<option>.yaml``; the message lists the options of every searched
      folder, the user's too.

    Everything else (bad override syntax, broken YAML, a key that is not in the config)
    is left to Hydra. Nothing is checked when ``--config-path`` replaces eenet's configs.

    Args:
        argv: the command line without the program name (``sys.argv[1:]``).

    Raises:
        EENetError: one line saying what is wrong and what is accepted.
    """
    args = _parse_command_line(argv)
    if args is None or args.config_path is not None:
        return
    extra = _user_config_dirs(args)
    check_config_dirs(extra)
    roots = [config_dir(), *extra]
    for override in args.overrides:
        key, sep, value = override.partition("=")
        group = key.lstrip("+~")
        if not sep or not group or "." in group or "@" in group or group.split("/")[0] == "hydra":
            continue
        folders = [r / group for r in roots if (r / group).is_dir()]
        if not folders:
            continue
        for option in _options(value):
            if not any((f / f"{option}.yaml").is_file() for f in folders):
                accepted = sorted({p.relative_to(f).with_suffix("").as_posix()
                                   for f in folders for p in f.rglob("*.yaml")})
                raise EENetError(f"unknown {group} '{option}'; accepted: {', '.join(accepted)}")
