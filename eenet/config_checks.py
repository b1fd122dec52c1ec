"""Checks of a composed config's options, in one place, before a job writes anything.

Each job (:mod:`eenet.jobs.train`, :mod:`eenet.jobs.evaluate`, :mod:`eenet.jobs.export`)
calls its check first. A bad option raises :class:`~eenet.errors.EENetError` with one
line naming the key, the value and what is accepted, e.g.
``optimizer.lr=-1.0 must be a finite number > 0``, or ``unknown mode 'frozen'; accepted:
joint, posttrain, mixed`` for a name (the form of every unknown name in eenet).

The checks are a table per job: rows ``(key, Accepts)`` read by one function,
:func:`check_options`. A key may hold ``*`` (one level) or ``**`` (any depth), so one
row covers the same option in every config of a group (``loss.**.lambda_coef`` is
``loss.lambda_coef`` in ``loss=eenet_v2`` and ``loss.second.lambda_coef`` in
``loss=two_stage``); a row whose key is not in the config is skipped. What one option
cannot say alone (exactly one calibration target, a checkpoint ``mode`` that fits its
``monitor``) is a short function after the table.

Objects built from the config check their own arguments where they are built, also
before anything is written, and are not checked again here: backbone, exit and
placement names (:mod:`eenet.models`), loss weights (:mod:`eenet.losses`), the data
module's sizes and names (:mod:`eenet.data`), policy names and threshold ranges in
``eenet-train`` and ``eenet-export`` (:mod:`eenet.policies`). This module adds what
those constructors cannot see (a string where a number is needed, a bool given as a
word) and the options that only Lightning or torch would read, after the run folder
had been written to (the optimizer, the scheduler, the trainer, the checkpoint).
One exception: the node names of a graph backbone's ``backbone.exits_at`` are checked
here as well, on the bare model, so that a wrong name is reported before the data set
is read (the cut checks them again for users of :func:`eenet.attach_exits`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from eenet.data.registry import check_folder
from eenet.calibration.guarantee import METHODS as GUARANTEE_METHODS
from eenet.calibration.risk import RISKS
from eenet.errors import EENetError
from eenet.models.graph_split import TOKEN_POOLS
from eenet.inference.backends import BACKENDS
from eenet.models.trecx import MITIGATIONS
from eenet.policies import POLICIES, TEMPERATURE_POLICIES, no_temperature_message
from eenet.training.metrics import LOG_KEYS, PER_EXIT_LOG_KEYS
from eenet.training.module import SCHEDULER_INTERVALS

#: ``mode`` of eenet-train (see conf/train.yaml)
MODES = ("joint", "posttrain", "mixed")
#: ``targets`` of eenet-train: what the exits learn
TARGETS = ("labels", "backbone")
#: Lightning's ``seed_everything`` refuses seeds outside numpy's range
SEED_MAX = 2 ** 32 - 1


# ---- what an option accepts ----------------------------------------------------------------------

@dataclass(frozen=True)
class Accepts:
    """What an option accepts: a test of its value and the words that say it.

    ``names``: the option takes one of these names; a bad one is reported as eenet reports
    every unknown name (``unknown mode 'frozen'; accepted: joint, posttrain, mixed``).
    """

    test: Callable[[Any], bool]
    text: str
    names: tuple = ()

    def error(self, key: str, value: Any) -> str:
        if self.names:
            return f"unknown {key} {show(value)}; accepted: {', '.join(map(str, self.names))}"
        return f"{key}={show(value)} must be {self.text}"

    def __or__(self, other: "Accepts") -> "Accepts":
        return Accepts(lambda v: self.test(v) or other.test(v), f"{self.text} or {other.text}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))


def integer(lo: int | None = None, hi: int | None = None) -> Accepts:
    """An integer (not a bool, not a float) in ``[lo, hi]``."""
    return Accepts(lambda v: _is_int(v) and _in_range(v, lo, hi, False, False),
                   f"an integer {_range_text(lo, hi, False, False)}".rstrip())


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Accepts:
    """A finite int or float (not a bool) in the range; ``*_open`` leaves the end out."""
    kind = "a number" if hi is not None else "a finite number"
    return Accepts(lambda v: _is_number(v) and math.isfinite(v)
                   and _in_range(v, lo, hi, lo_open, hi_open),
                   f"{kind} {_range_text(lo, hi, lo_open, hi_open)}".rstrip())


def boolean() -> Accepts:
    """``true`` or ``false`` (a word such as ``yes`` or ``maybe`` is a string to Hydra)."""
    return Accepts(lambda v: isinstance(v, bool), "true or false")


def choice(values: Iterable[Any]) -> Accepts:
    """One of ``values`` (``1`` is not ``true``)."""
    values = tuple(values)
    return Accepts(lambda v: any(v == x and isinstance(v, bool) == isinstance(x, bool)
                                 for x in values),
                   f"one of {', '.join(str(x) for x in values)}", names=values)


def path() -> Accepts:
    """A path, as a non-empty string."""
    return Accepts(lambda v: isinstance(v, str) and v != "",
                   "a path, quoted if Hydra would read it as a number or true/false")


def mapping() -> Accepts:
    """A mapping of keyword options."""
    return Accepts(lambda v: isinstance(v, dict), "a mapping such as {project: eenet}")


def name_list() -> Accepts:
    """A list of non-empty strings (``[layer1, layer3]``; a bare ``layer1`` is a string)."""
    return Accepts(lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
                   "a list of node names such as [layer1, layer3]")


def int_list(lo: int | None = None) -> Accepts:
    """A list of integers >= ``lo``."""
    return Accepts(lambda v: isinstance(v, list) and all(_is_int(x) and _in_range(x, lo, None, False, False)
                                                         for x in v),
                   f"a list of integers {_range_text(lo, None, False, False)}".rstrip())


def pair(of: Accepts) -> Accepts:
    """A list of two values, each accepted by ``of``."""
    return Accepts(lambda v: isinstance(v, list) and len(v) == 2 and all(of.test(x) for x in v),
                   f"two values, each {of.text}")


NULL = Accepts(lambda v: v is None, "null")


def nullable(of: Accepts, meaning: str) -> Accepts:
    """``of``, or null, which means ``meaning``."""
    names = (*of.names, f"null ({meaning})") if of.names else ()
    return Accepts(lambda v: v is None or of.test(v), f"{of.text} (or null: {meaning})", names)


def said(of: Accepts, text: str) -> Accepts:
    """``of``'s test, in words of one's own (for unions and reasons)."""
    return Accepts(of.test, text)


# ---- reading the config --------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def find(cfg: DictConfig, key: str) -> Iterable[tuple[str, Any]]:
    """``(full key, plain value)`` of every option that ``key`` names (``*``: one level,
    ``**``: any depth, zero levels included); none when it is not in the config."""

    def join(prefix: str, k: Any) -> str:
        return f"{prefix}.{k}" if prefix else str(k)

    def walk(node: Any, parts: Sequence[str], prefix: str) -> Iterable[tuple[str, Any]]:
        if not parts:
            yield prefix, _plain(node)
            return
        if not isinstance(node, DictConfig):
            return
        head, rest = parts[0], parts[1:]
        if head == "**":
            yield from walk(node, rest, prefix)
            for k in node:
                if isinstance(node[k], DictConfig):
                    yield from walk(node[k], parts, join(prefix, k))
        elif head == "*":
            for k in node:
                yield from walk(node[k], rest, join(prefix, k))
        elif head in node:
            yield from walk(node[head], rest, join(prefix, head))

    return walk(cfg, key.split("."), "")


def get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """The plain value of one option (``default`` when it is not in the config)."""
    return next((v for _, v in find(cfg, key)), default)


def show(value: Any) -> str:
    """A value as the user would write it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)


def check_options(cfg: DictConfig, rules: Sequence[tuple[str, Accepts]]) -> None:
    """Raise :class:`EENetError` for the first option a row of ``rules`` does not accept."""
    for key, accepts in rules:
        for name, value in find(cfg, key):
            if not accepts.test(value):
                raise EENetError(accepts.error(name, value))


# ---- the tables ----------------------------------------------------------------------------------

THREADS = nullable(integer(1), "torch's default")
BATCHES = said(integer(0) | number(0, 1), "an integer >= 0 (batches) or a float in [0, 1] (a fraction)")
_VAL_KEYS = sorted({f"val/{k}" for k in LOG_KEYS.values()})
_VAL_PATTERN = re.compile("|".join([*map(re.escape, _VAL_KEYS),
                                    rf"val/exit\d+/({'|'.join(PER_EXIT_LOG_KEYS.values())})"]))
MONITOR = Accepts(lambda v: isinstance(v, str) and _VAL_PATTERN.fullmatch(v) is not None,
                  f"a key logged on the validation split ({', '.join(_VAL_KEYS)}, val/exit<i>/"
                  f"{{{','.join(PER_EXIT_LOG_KEYS.values())}}}): checkpoints are chosen on val, "
                  f"never on test")
VAL_SIZE = said(number(0, 1, lo_open=True, hi_open=True) | integer(1),
                "a fraction in (0, 1) or a sample count >= 1: checkpoints and thresholds are "
                "chosen on the validation split")
#: The budget is an average cost per sample as a fraction of the backbone's MACs; above 1
#: it would allow more than the backbone itself costs (50 is not 50 %).
BUDGET = number(0, 1, lo_open=True)
BUDGET_TEXT = "an average cost fraction in (0, 1] of the backbone's MACs (0.5 is half)"


def _precisions() -> list:
    """Lightning's precision values (read from its own type; none if it moved)."""
    import typing

    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:
        return []

    def flat(t: Any) -> list:
        args = typing.get_args(t)
        return [x for a in args for x in (flat(a) if typing.get_args(a) else [a])]

    return list(dict.fromkeys(str(p) for p in flat(_PRECISION_INPUT)))


TRAIN_RULES: list[tuple[str, Accepts]] = [
    ("mode", choice(MODES)),
    ("targets", choice(TARGETS)),
    ("mitigation", nullable(choice(MITIGATIONS), "no mitigation")),
    ("seed", integer(0, SEED_MAX)),
    ("threads", THREADS),
    ("anytime", boolean()),
    ("sync_batchnorm", boolean()),
    ("channels_last", boolean()),
    ("resume", boolean()),
    ("overwrite", boolean()),
    ("confidence_lr_scale", number(0, lo_open=True)),
    ("objective_budget", said(BUDGET | NULL, f"{BUDGET_TEXT}, or null (val accuracy)")),
    ("checkpoint.enabled", boolean()),
    ("checkpoint.mode", choice(("min", "max"))),
    ("checkpoint.monitor", MONITOR),
    ("trainer.max_epochs", integer(1)),
    ("trainer.devices", said(integer(1) | choice(("auto",)) | int_list(0),
                             "an integer >= 1, 'auto' or a list of device indices")),
    ("trainer.num_nodes", integer(1)),
    ("trainer.log_every_n_steps", integer(1)),
    ("trainer.num_sanity_val_steps", said(integer(-1), "an integer >= -1 (-1: the whole "
                                                       "validation split)")),
    ("trainer.enable_progress_bar", boolean()),
    ("trainer.enable_model_summary", boolean()),
    ("trainer.use_distributed_sampler", boolean()),
    ("trainer.deterministic", said(boolean() | choice(("warn",)) | NULL,
                                   "true, false or 'warn' (or null: torch's default)")),
    ("trainer.fast_dev_run", said(boolean() | integer(0), "true, false or an integer >= 0 (batches)")),
    ("trainer.overfit_batches", BATCHES),
    ("trainer.limit_train_batches", BATCHES),
    ("trainer.limit_val_batches", BATCHES),
    ("trainer.limit_test_batches", BATCHES),
    ("trainer.max_steps", said(integer(-1), "an integer >= -1 (-1: no limit)")),
    ("trainer.accumulate_grad_batches", integer(1)),
    ("trainer.gradient_clip_val", nullable(number(0), "no clipping")),
    ("optimizer.lr", number(0, lo_open=True)),
    ("optimizer.weight_decay", number(0)),
    ("optimizer.momentum", number(0, 1, hi_open=True)),
    ("optimizer.dampening", number(0, 1, hi_open=True)),
    ("optimizer.nesterov", boolean()),
    ("optimizer.betas", pair(number(0, 1, hi_open=True))),
    ("optimizer.eps", number(0, lo_open=True)),
    ("optimizer.amsgrad", boolean()),
    ("scheduler.interval", choice(SCHEDULER_INTERVALS)),
    ("scheduler.total_steps", nullable(integer(1), "the run's steps")),
    ("scheduler.T_max", nullable(integer(1), "the run's steps")),
    ("scheduler.eta_min", number(0)),
    ("scheduler.step_size", integer(1)),
    ("scheduler.gamma", number(0, lo_open=True)),
    ("ema.decay", number(0, 1, lo_open=True, hi_open=True)),
    ("dataset.in_chans", integer(1)),
    ("dataset.datamodule.val_size", VAL_SIZE),
    ("dataset.datamodule.download", boolean()),
    ("dataset.datamodule.drop_last", boolean()),
    # the groups' own constructors check these ranges (before anything is written), not the types
    ("placement.num_exits", integer()),
    ("placement.stages", nullable(int_list(), "placed by placement.method")),
    # graph backbones (torchvision, timm, graph): the names are checked on the traced model
    # by _exit_nodes, below
    ("backbone.exits_at", nullable(name_list(), "placed by placement.method among the block "
                                                "outputs")),
    ("backbone.tokens", choice(TOKEN_POOLS)),
    ("exit.convs", integer()),
    ("exit.width", nullable(integer(1), "the stage's channels")),
    ("exit.stride", integer()),
    ("exit.width_growth", number()),
    ("loss.**.lambda_coef", number()),
    ("loss.**.first_epochs", integer()),
    ("loss.**.ramp_epochs", integer()),
    ("loss.**.ramp_start", number(0)),
    ("loss.**.temperature", number()),
]

EVAL_RULES: list[tuple[str, Accepts]] = [
    ("run", path()),
    ("budget", said(BUDGET | NULL, f"{BUDGET_TEXT}, or null")),
    ("tolerance", said(number(0, 100) | NULL, "accuracy points in [0, 100] below the "
                                                     "final exit's accuracy, or null")),
    ("min_accuracy", said(number(0, 1) | NULL, "a fraction in [0, 1] (0.9 is 90 %), or null")),
    ("optimism_folds", said(choice((0,)) | integer(2), "0 (no optimism correction) or a number of "
                                                       "folds >= 2")),
    ("optimism_repeats", integer(1)),
    ("guarantee", said(choice(tuple(GUARANTEE_METHODS)) | NULL,
                       f"one of {', '.join(GUARANTEE_METHODS)}, or null (no guarantee)")),
    ("risk", choice(tuple(RISKS))),
    ("alpha", said(number(0, 1) | NULL, "a fraction in (0, 1) (0.01 is one point), or null")),
    ("delta", said(number(0, 1), "a probability in (0, 1)")),
    ("policy", choice(POLICIES)),
    ("temperature", boolean()),
    ("engine", choice(BACKENDS)),
    ("cost", nullable(choice(("macs", "latency")),
                      "macs, or latency with budget_ms or budget_p95_ms")),
    ("budget_ms", said(number(0, lo_open=True) | NULL,
                       "milliseconds > 0 (the expected time per sample at batch 1), or null")),
    ("budget_p95_ms", said(number(0, lo_open=True) | NULL,
                           "milliseconds > 0 (the expected p95 of the time per sample at batch "
                           "1), or null")),
    ("engine_cache", nullable(path(), "RUN_DIR/engine_cache")),
    ("tail_latency", boolean()),
    ("latency_samples", nullable(integer(1), "every test sample")),
    ("batch_size", integer(1)),
    ("grid", said(integer(2), "an integer >= 2 (candidate thresholds per exit)")),
    ("latency", boolean()),
    ("overwrite", boolean()),
    ("timing_passes", said(integer(0), "an integer >= 0 (0: no timing)")),
    ("threads", THREADS),
    ("data_root", nullable(path(), "where the run was trained")),
    ("wandb", nullable(mapping(), "no W&B")),
]

EXPORT_RULES: list[tuple[str, Accepts]] = [
    ("run", path()),
    ("eval", nullable(path(), "policy= and thresholds= instead")),
    ("out", nullable(path(), "RUN_DIR/onnx")),
    ("check", boolean()),
    ("overwrite", boolean()),
    ("threads", THREADS),
    ("data_root", nullable(path(), "where the run was trained")),
]


def _opset_rule() -> tuple[str, Accepts]:
    """The ONNX opsets torch's exporter takes here (read from torch; below 7 there is none,
    and onnxruntime could not load this library's BatchNorm at opsets 5 and 6)."""
    try:
        from torch.onnx import _constants
        lo, hi = int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return "opset", integer(7)
    return "opset", said(integer(lo, hi), f"an integer in [{lo}, {hi}] (the opsets torch.onnx "
                                          f"exports here)")


# ---- what one option cannot say alone ------------------------------------------------------------

def _needs_run(cfg: DictConfig, verb: str) -> None:
    if cfg.get("run") in (None, "???", ""):
        raise EENetError(f"give the training run to {verb}: run=RUN_DIR")


def _data_root(cfg: DictConfig) -> None:
    """``data_root``, when given, must be a folder that can be read (or not exist yet)."""
    root = cfg.get("data_root")
    if isinstance(root, str) and root:
        check_folder(root, "data_root")


def _trained_backbone(cfg: DictConfig) -> None:
    mode = get(cfg, "mode", "joint")
    if mode in ("posttrain", "mixed") and not (get(cfg, "backbone.checkpoint")
                                               or get(cfg, "backbone.weights")):
        raise EENetError(f"mode={mode} starts from a trained backbone: give backbone.checkpoint="
                         f"<run folder or state_dict> (or backbone.weights= for torchvision)")


#: the builders of the backbones cut at graph nodes (``backbone.exits_at``)
GRAPH_BACKBONES = tuple(f"eenet.models.graph_backbone.{f}_backbone"
                        for f in ("torchvision", "timm", "graph"))


def _exits_at_or_placement(cfg: DictConfig) -> None:
    """``backbone.exits_at`` places the exits itself: ``placement.stages`` beside it would be
    silently ignored (:func:`eenet.build.build_early_exit_network`)."""
    at, stages = get(cfg, "backbone.exits_at"), get(cfg, "placement.stages")
    if at is not None and stages is not None:
        raise EENetError(f"backbone.exits_at={show(at)} places the exits, placement.stages="
                         f"{show(stages)} would not be read; give one of them (placement.stages "
                         f"indexes the model's block outputs when backbone.exits_at=null)")


def _exit_nodes(cfg: DictConfig) -> None:
    """Every name of ``backbone.exits_at`` is a node of the model's traced graph.

    Checked here, before the data set is read (which may take minutes), on the bare
    architecture: no checkpoint loaded, no published weights fetched (the names do not
    depend on the weights). A name that is not there is reported with the nearest
    names, as the cut itself reports it (:mod:`eenet.models.graph_split`); the order
    of the names and what a node outputs are checked where the graph is cut.
    """
    at = get(cfg, "backbone.exits_at")
    if not at or get(cfg, "backbone._target_") not in GRAPH_BACKBONES:
        return
    from eenet.config import instantiate
    from eenet.models.graph_split import _resolve, trace

    bare = OmegaConf.create({**_plain(cfg.backbone), "exits_at": None, "checkpoint": None,
                             "pretrained": False})
    model = instantiate(bare, "backbone").model
    gm, names = trace(model, training=False)
    order = list(gm.graph.nodes)
    for name in at:
        try:
            _resolve(name, order, names, type(model).__name__)
        except EENetError as exc:
            raise EENetError(f"backbone.exits_at: {exc}") from None


def _ema(cfg: DictConfig) -> None:
    """``ema`` is null (no averaging) or a mapping with ``decay`` (checked by the rules)."""
    ema = get(cfg, "ema")
    if ema is not None and not (isinstance(ema, dict) and "decay" in ema):
        raise EENetError(f"ema={show(ema)} must be null (no weight averaging) or a mapping with "
                         f"its decay per optimizer step, e.g. +ema.decay=0.998")


def _checkpoint_direction(cfg: DictConfig) -> None:
    """A monitor whose better value is known must be optimised the right way round."""
    monitor, mode = get(cfg, "checkpoint.monitor"), get(cfg, "checkpoint.mode")
    if not get(cfg, "checkpoint.enabled", True) or not isinstance(monitor, str):
        return
    name = monitor.rsplit("/", 1)[-1]
    better = {"acc": "max", "mixture_acc": "max", "oracle_acc": "max", "loss": "min"}.get(name)
    if better and mode != better:
        raise EENetError(f"checkpoint.mode={mode} with checkpoint.monitor={monitor} keeps the worst "
                         f"checkpoint; give checkpoint.mode={better}")


def _nesterov(cfg: DictConfig) -> None:
    if get(cfg, "optimizer.nesterov") is True:
        momentum, dampening = get(cfg, "optimizer.momentum", 0), get(cfg, "optimizer.dampening", 0)
        if not momentum > 0 or dampening != 0:
            raise EENetError(f"optimizer.nesterov=true needs optimizer.momentum > 0 and "
                             f"optimizer.dampening=0, got momentum={momentum}, dampening={dampening}")


def _val_below_subset(cfg: DictConfig) -> None:
    val, subset = get(cfg, "dataset.datamodule.val_size"), get(cfg, "dataset.datamodule.train_subset")
    if _is_int(val) and _is_int(subset) and val >= subset:
        raise EENetError(f"dataset.datamodule.val_size={val} must be below "
                         f"dataset.datamodule.train_subset={subset}, the training samples it is "
                         f"taken from")


def _accelerator(cfg: DictConfig) -> None:
    """``trainer.accelerator``: one Lightning knows, with a device of that kind here."""
    name = get(cfg, "trainer.accelerator")
    if name is None or name == "auto":
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    known = sorted(AcceleratorRegistry.available_accelerators())
    kinds = ("cuda", "mps") if name == "gpu" else (name,)
    if not isinstance(name, str) or not set(kinds) <= set(known):
        raise EENetError(f"unknown trainer.accelerator {show(name)}; accepted: "
                         f"{', '.join(['auto', 'gpu', *known])}")
    here = [k for k in known if AcceleratorRegistry[k]["accelerator"].is_available()]
    if not any(k in here for k in kinds):
        raise EENetError(f"trainer.accelerator={name}: no such device here; available here: "
                         f"auto, {', '.join(here)}")


def _one_target(cfg: DictConfig) -> None:
    given = [k for k in ("budget", "tolerance", "min_accuracy") if cfg.get(k) is not None]
    if cfg.get("guarantee") is not None:
        if cfg.get("alpha") is None or not 0 < cfg.alpha < 1:
            raise EENetError(f"guarantee={cfg.guarantee} certifies a risk level: give alpha=A, a "
                             f"fraction in (0, 1) (0.01 is one accuracy point)")
        if given:
            raise EENetError(f"guarantee={cfg.guarantee} chooses the thresholds for alpha; drop "
                             f"{', '.join(given)}")
        return
    if cfg.get("alpha") is not None:
        raise EENetError("alpha= is the level of a certified risk: give guarantee=ltt|ucb|crc too")
    if len(given) != 1:
        got = f" (got {', '.join(f'{k}={show(cfg.get(k))}' for k in given)})" if given else ""
        raise EENetError("give exactly one calibration target: budget=B (average cost fraction), "
                         "tolerance=D (accuracy points below the final exit) or min_accuracy=A"
                         + got)


def _temperature_policy(cfg: DictConfig) -> None:
    """``temperature=true`` only with a policy that scores a softmax of the logits."""
    if cfg.get("temperature") is True and cfg.get("policy") not in TEMPERATURE_POLICIES:
        raise EENetError(f"temperature=true: {no_temperature_message(cfg.policy, 'temperature=false')}")


#: the budgets in milliseconds: a target of their own, alone or together (both then hold)
MS_BUDGETS = ("budget_ms", "budget_p95_ms")


def _budget_ms(cfg: DictConfig) -> None:
    """``budget_ms`` and ``budget_p95_ms`` are a target of their own (one, or both: every
    budget holds), calibrated on measured latencies (not MACs)."""
    given = [k for k in MS_BUDGETS if cfg.get(k) is not None]
    if not given:
        return
    asked = " and ".join(f"{k}={show(cfg.get(k))}" for k in given)
    others = [k for k in ("budget", "tolerance", "min_accuracy", "guarantee")
              if cfg.get(k) is not None]
    if others:
        raise EENetError(f"{asked} {'is' if len(given) == 1 else 'are'} a calibration target "
                         f"of {'its' if len(given) == 1 else 'their'} own: drop "
                         f"{', '.join(f'{k}={show(cfg.get(k))}' for k in others)}")
    if cfg.get("cost") == "macs":
        raise EENetError(f"{asked} {'is' if len(given) == 1 else 'are'} in milliseconds: "
                         f"{'it needs' if len(given) == 1 else 'they need'} measured latencies as "
                         f"the cost (cost=latency, or leave cost out); with cost=macs give "
                         f"budget=B (a fraction of the MACs)")


def _engine_installed(cfg: DictConfig) -> None:
    """``engine=onnxruntime`` needs the onnxruntime and onnx packages (eenet's ``export`` extra)."""
    if cfg.get("engine") == "onnxruntime":
        import importlib.util

        missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            raise EENetError(f"engine=onnxruntime needs the package(s) {', '.join(missing)}, not "
                             f"installed here: pip install 'eenet[export]', or give engine=eager "
                             f"or engine=compiled")


def _optimism_needs_tolerance(cfg: DictConfig) -> None:
    if cfg.get("optimism_folds") and cfg.get("tolerance") is None:
        raise EENetError(f"optimism_folds={cfg.optimism_folds} corrects a tolerance target; "
                         f"give tolerance=D instead of budget= or min_accuracy=")


# ---- the three jobs ------------------------------------------------------------------------------

def check_train_config(cfg: DictConfig) -> None:
    """The options of ``eenet-train`` (``conf/train.yaml`` and its groups)."""
    precisions = _precisions()
    precision = Accepts(lambda v: not isinstance(v, bool) and str(v) in [*precisions, "auto"],
                        f"one of auto, {', '.join(precisions)}", names=("auto", *precisions))
    rules = TRAIN_RULES + ([("trainer.precision", precision)] if precisions else [])
    check_options(cfg, rules)
    for check in (_data_root, _trained_backbone, _checkpoint_direction, _nesterov, _ema,
                  _val_below_subset, _accelerator, _exits_at_or_placement, _exit_nodes):
        check(cfg)


def check_eval_config(cfg: DictConfig) -> None:
    """The options of ``eenet-eval`` (``conf/eval.yaml``)."""
    _needs_run(cfg, "evaluate")
    check_options(cfg, EVAL_RULES)
    _data_root(cfg)
    if all(cfg.get(k) is None for k in MS_BUDGETS):
        _one_target(cfg)
    _budget_ms(cfg)
    _optimism_needs_tolerance(cfg)
    _temperature_policy(cfg)
    _engine_installed(cfg)


def check_export_config(cfg: DictConfig) -> None:
    """The options of ``eenet-export`` (``conf/export.yaml``)."""
    _needs_run(cfg, "export")
    check_options(cfg, [*EXPORT_RULES, _opset_rule()])
    _data_root(cfg)
