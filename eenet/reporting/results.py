"""The results of a run as typed objects, and their file ``results.json`` (with ``results.md``).

One vocabulary from the metrics to the file: :class:`SplitResult` is what
:class:`eenet.training.ExitMetrics` computes during training and what
``eenet-eval`` measures with the dynamic engine, :class:`ExitResult` is one row
of the per-exit table, :class:`RunResults` is the whole file. The attribute
names are the keys of ``results.json``; ``to_dict`` writes the file's layout
and ``from_dict`` reads it back, so ``RunResults.from_dict(d).to_dict() == d``
for every file eenet has written (those made before ``format_version`` included),
but one key: ``latency`` is a mapping (:func:`latency_section`), and the list that
``eenet-eval latency=true`` wrote there before (the eager per-exit table) is read as
``{"exit_table": [...]}``.

Layout (later versions add keys and never remove these; format 2 changed what
entropy thresholds mean, see below)::

    {"format_version", "eenet_version",
     "dataset", "backbone", "num_classes", "backbone_macs", "macs_convention", "input_size",
     "exits": [{"name", "stage", "macs", "head_macs", "cost_fraction",
                "val_accuracy", "test_accuracy", "test_overthinking"?}, ...],
     "policy": {"name", "thresholds", "temperatures"? (format 3)},
     "test": {"accuracy", "avg_cost_fraction", "exit_rates", "n",
              "mixture_acc"?, "expected_cost"?, "oracle_acc"?},
     "val": {"accuracy", "avg_cost_fraction", "exit_rates", "n"},
     eenet-train (:class:`TrainingRecord`): "splits", "epochs", "best_checkpoint",
         "val_loss", "test_loss", "resumed_from", "world_size", "mode", "targets",
         "backbone_hash_before", "backbone_hash_after", "train_epoch_seconds",
         "training_segments"? (each process that trained the run: its machine (CPU, cores,
         torch threads, versions), device, epochs [first, last] and wall_s;
         eenet.training.checkpoint.EpochTimer),
     eenet-eval (:class:`EvaluationRecord`): "run", "target", "calibration",
         "engine" (:class:`EngineResult`), "drop_vs_final_exit"
         ("calibration" holds "temperature" with eenet-eval temperature=true),
     "config", "anytime"?, "objective"?, "latency"?, "wall_s"?}

``latency`` (eenet-eval, :mod:`eenet.jobs.evaluate`) is a mapping: ``"exit_table"`` (the eager
per-exit table, ``latency=true``) and / or the per-sample latency at batch 1 on test
(``"p50_ms"``, ``"p95_ms"``, ``"p99_ms"``, ``"max_ms"``, ``"mean_ms"``, ``"backend"``,
``"plain"``, ``"speedup"``, ``"speedup_p95"``, ``"expected"``?, ``"budget"``?, ...).

For a split, with n samples, count_i samples leaving at exit i and c_i exit
i's cost fraction (MACs to exit i over the backbone's MACs; fvcore's
convention, one fused multiply-add = one flop)::

    accuracy = (samples right at the exit they left at) / n
    avg_cost_fraction = sum_i count_i * c_i / n,   exit_rates[i] = count_i / n

``format_version`` (an integer, :data:`FORMAT_VERSION`) says which layout a file
has; a file without it predates it (format 0, the same keys). A run whose file
has a larger version, or top-level keys this eenet does not know, was written
by a newer eenet and is refused (:func:`check_results_file`) rather than read
with a meaning it may not have. Files are written atomically
(:func:`eenet.io.atomic_write_text`).

Format 3 adds the policy's per-exit temperatures (``policy.temperatures``, one
T_i > 0 per exit, the final exit included: exit i's score is that of its logits
/ T_i, :mod:`eenet.policies`) and ``calibration.temperature`` (the fit on val,
the per-exit expected calibration error on val and test before and after). A
file without temperatures is written as format 2 (:data:`PLAIN_FORMAT`), which
eenet has read the same way since format 2; a file with them as format 3, so
that an eenet that would ignore the temperatures refuses it instead.

Thresholds (``policy.thresholds``, the calibration's points) are in the user's
units of :mod:`eenet.policies`: a sample leaves exit i when its score > t_i, so
``"inf"`` means "never leave here" for every policy. Format 2 changed the
entropy policy's threshold from the entropy (leave when H < t, ``"inf"``:
always leave) to -H units (leave when -H > t); the keys are the same. A file
of format 0 or 1 with entropy thresholds is refused when its thresholds are
read (:func:`check_thresholds_readable`: :meth:`RunResults.from_dict`,
:func:`read_policy`), in one line saying to re-run eenet-eval; other old files
are read as before. (The old thresholds h would convert exactly to -h, but
not the whole file's text, e.g. results.md, so eenet refuses rather than
rewrite it.) Loading a run folder (:func:`check_results_file`) does not read
thresholds and does not refuse it for that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eenet import __version__
from eenet.cost import CostTable
from eenet.errors import EENetError
from eenet.io import atomic_write_text, first_line
from eenet.reporting.markdown import results_markdown
from eenet.run_folder import MARKER

#: The newest layout this eenet reads and writes (2: entropy thresholds in -H units;
#: 3: the policy's temperatures).
FORMAT_VERSION = 3
#: The layout written for a file without temperatures (the same keys and meanings as before 3).
PLAIN_FORMAT = 2
#: The first format whose policy may carry temperatures.
TEMPERATURES_FROM = 3
#: The first format whose entropy thresholds mean "leave when -H > t" (before: "H < t").
ENTROPY_AS_NEGATIVE_FROM = 2

_TRAINING_KEYS = ("splits", "epochs", "best_checkpoint", "val_loss", "test_loss", "resumed_from",
                  "world_size", "mode", "targets", "backbone_hash_before", "backbone_hash_after",
                  "train_epoch_seconds", "training_segments")
_EVALUATION_KEYS = ("run", "target", "calibration", "engine", "drop_vs_final_exit")
#: Every top-level key of ``results.json``, in the order it is written.
TOP_LEVEL_KEYS = ("format_version", "eenet_version", "dataset", "backbone", "num_classes",
                  "backbone_macs", "macs_convention", "input_size", "exits", "policy", "test",
                  "val", *_TRAINING_KEYS, *_EVALUATION_KEYS, "config", "anytime", "objective",
                  "latency", "wall_s")


@dataclass
class SplitResult:
    """What the exit policy gives on one split (see the module docstring for the formulas).

    Attributes:
        accuracy: share of samples classified right at the exit they left at.
        avg_cost_fraction: average cost fraction paid per sample.
        exit_rates: share of samples leaving at each exit (sums to 1).
        n: number of samples.
        exit_accuracy: each exit's accuracy when every sample is read there (static path);
            written as the ``val_accuracy`` / ``test_accuracy`` of the exit rows.
        overthinking: per exit, the share right there but wrong at the final exit
            (Kaya et al., "Shallow-Deep Networks", ICML 2019); ``test_overthinking`` of the rows.
        oracle_acc: share of samples that some exit classifies right.
        mixture_acc: accuracy of EENets' mixture P_0 (``eenet.losses``).
        expected_cost: EENets' expected cost E[C_0] of the mixture.
        loss: the epoch mean of the training loss (``val_loss`` / ``test_loss``).
    """

    accuracy: float
    avg_cost_fraction: float
    exit_rates: list[float]
    n: int
    exit_accuracy: list[float] | None = None
    overthinking: list[float] | None = None
    oracle_acc: float | None = None
    mixture_acc: float | None = None
    expected_cost: float | None = None
    loss: float | None = None

    #: written in the split's section of results.json when set (the rest lives elsewhere)
    SECTION_OPTIONAL = ("mixture_acc", "expected_cost", "oracle_acc")

    @classmethod
    def from_counts(cls, exit_count: torch.Tensor, correct: int | torch.Tensor, costs,
                    exit_correct: torch.Tensor | None = None,
                    overthink: torch.Tensor | None = None,
                    oracle_correct: int | torch.Tensor | None = None,
                    mixture_correct: int | torch.Tensor | None = None,
                    expected_cost_sum: float | torch.Tensor | None = None) -> "SplitResult":
        """A split's result from sums over its samples (training metrics and eenet-eval).

        Args:
            exit_count: samples leaving at each exit, (N+1,).
            correct: samples right at the exit they left at.
            costs: cost fraction c_i of each exit, (N+1,).
            exit_correct: per exit, samples it classifies right (static path).
            overthink: per exit, samples right there and wrong at the final exit.
            oracle_correct: samples some exit classifies right.
            mixture_correct: samples EENets' mixture P_0 classifies right.
            expected_cost_sum: the sum over samples of the mixture's expected cost.
        """
        counts = exit_count.double()
        total = int(counts.sum())
        n = max(total, 1)
        costs = torch.as_tensor(costs, dtype=torch.float64)

        def share(v):
            return None if v is None else float(v) / n

        return cls(
            accuracy=float(correct) / n,
            avg_cost_fraction=float((counts * costs).sum()) / n,
            exit_rates=(counts / n).tolist(),
            n=total,
            exit_accuracy=None if exit_correct is None else (exit_correct.double() / n).tolist(),
            overthinking=None if overthink is None else (overthink.double() / n).tolist(),
            oracle_acc=share(oracle_correct), mixture_acc=share(mixture_correct),
            expected_cost=share(expected_cost_sum))

    def section(self, extras: bool = True) -> dict:
        """The split's section of results.json; ``extras``: with the mixture and oracle
        figures when set (the test section has them, the val section never had)."""
        out = {"accuracy": self.accuracy, "avg_cost_fraction": self.avg_cost_fraction,
               "exit_rates": list(self.exit_rates), "n": self.n}
        for key in self.SECTION_OPTIONAL if extras else ():
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_section(cls, d: dict, exit_accuracy: list[float] | None = None,
                     overthinking: list[float] | None = None,
                     loss: float | None = None) -> "SplitResult":
        return cls(accuracy=d["accuracy"], avg_cost_fraction=d["avg_cost_fraction"],
                   exit_rates=list(d["exit_rates"]), n=d["n"], exit_accuracy=exit_accuracy,
                   overthinking=overthinking, loss=loss,
                   **{k: d[k] for k in cls.SECTION_OPTIONAL if k in d})


@dataclass
class ExitResult:
    """One exit of a run: where it is, what it costs, how accurate it is on val and test.

    ``macs`` are the MACs to reach and evaluate the exit (every head on the way
    included), ``head_macs`` its own head's, ``cost_fraction`` = macs / backbone MACs.
    """

    name: str
    stage: int
    macs: int
    head_macs: int
    cost_fraction: float
    val_accuracy: float
    test_accuracy: float
    test_overthinking: float | None = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "stage": self.stage, "macs": self.macs,
               "head_macs": self.head_macs, "cost_fraction": self.cost_fraction,
               "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy}
        if self.test_overthinking is not None:
            out["test_overthinking"] = self.test_overthinking
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ExitResult":
        return cls(**{k: d[k] for k in ("name", "stage", "macs", "head_macs", "cost_fraction",
                                         "val_accuracy", "test_accuracy")},
                   test_overthinking=d.get("test_overthinking"))


@dataclass
class EngineResult:
    """The dynamic engine on the test split (eenet-eval).

    Attributes:
        batch_size: batch size of every pass.
        wall_s: the pass that made the test predictions, batch loading included.
        agreement_with_static: share of test samples whose exit equals static path + policy.
        dynamic_wall_s: median seconds of the dynamic engine over the test split
            (network time only), over ``timed_passes`` passes.
        final_exit_wall_s: the same for the network run to its final exit with every
            early exit off (stages and final head only), timed in the same passes,
            batch by batch, alternating which of the two runs first.
        speedup: final_exit_wall_s / dynamic_wall_s (measured, not computed from MACs).
        timed_passes: number of timed passes of each.
        threads: torch threads during the timing.
        dynamic_pass_s, final_exit_pass_s: every timed pass, in seconds.
        machine: where every timing of the file was measured (this section's and
            ``latency``'s): CPU, cores, torch threads, versions
            (:func:`eenet.reporting.experiment.run_machine`); absent in files made before.
    """

    batch_size: int
    wall_s: float
    agreement_with_static: float
    dynamic_wall_s: float | None = None
    final_exit_wall_s: float | None = None
    speedup: float | None = None
    timed_passes: int | None = None
    threads: int | None = None
    dynamic_pass_s: list[float] | None = None
    final_exit_pass_s: list[float] | None = None
    machine: dict | None = None

    _OPTIONAL = ("dynamic_wall_s", "final_exit_wall_s", "speedup", "timed_passes", "threads",
                 "dynamic_pass_s", "final_exit_pass_s", "machine")

    def to_dict(self) -> dict:
        out = {"batch_size": self.batch_size, "wall_s": self.wall_s,
               "agreement_with_static": self.agreement_with_static}
        out.update({k: getattr(self, k) for k in self._OPTIONAL if getattr(self, k) is not None})
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "EngineResult":
        return cls(batch_size=d["batch_size"], wall_s=d["wall_s"],
                   agreement_with_static=d["agreement_with_static"],
                   **{k: d[k] for k in cls._OPTIONAL if k in d})


@dataclass
class TrainingRecord:
    """What eenet-train adds: how the run was trained (the losses are in the splits)."""

    splits: dict | None
    epochs: int
    best_checkpoint: str | None
    resumed_from: str | None
    world_size: int
    mode: str
    targets: str
    backbone_hash_before: str
    backbone_hash_after: str
    train_epoch_seconds: list[float]
    #: every process that trained the run (:class:`eenet.training.checkpoint.EpochTimer`);
    #: None in a file written before it was recorded
    segments: list[dict] | None = None


@dataclass
class EvaluationRecord:
    """What eenet-eval adds: the run evaluated, the calibration on val, the engine on test.

    ``target`` and ``calibration`` are :class:`eenet.calibration.CalibrationResult`'s
    JSON form (thresholds chosen on val, the curve, the Pareto front) plus the test
    curve and the final exit on test; ``drop_vs_final_exit`` is
    :func:`eenet.calibration.paired_drop` on val and on test.
    """

    run: str
    target: dict
    calibration: dict
    engine: EngineResult
    drop_vs_final_exit: dict


@dataclass
class RunResults:
    """The results of a training run or of an evaluation: everything ``results.json`` holds."""

    dataset: str
    backbone: str
    num_classes: int
    backbone_macs: int
    macs_convention: str
    input_size: list[int]
    exits: list[ExitResult]
    policy: dict
    test: SplitResult
    val: SplitResult
    config: dict
    training: TrainingRecord | None = None
    evaluation: EvaluationRecord | None = None
    anytime: dict | None = None
    objective: dict | None = None
    latency: dict | None = None
    wall_s: float | None = None
    #: the layout; :meth:`to_dict` writes at least :data:`TEMPERATURES_FROM` when the policy
    #: carries temperatures
    format_version: int | None = PLAIN_FORMAT
    eenet_version: str | None = __version__

    def __post_init__(self) -> None:
        self.latency = latency_section(self.latency) or None  # one layout: a mapping

    @classmethod
    def build(cls, dataset: str, backbone: str, num_classes: int, cost: CostTable,
              val: SplitResult, test: SplitResult, policy: dict, config: dict,
              **sections: Any) -> "RunResults":
        """A run's results from its cost table and the val / test results of its policy.

        ``val`` and ``test`` must carry ``exit_accuracy`` (one per exit of ``cost``);
        ``sections`` are the other fields (``training``, ``evaluation``, ``anytime``, ...).
        """
        over = test.overthinking or [None] * len(cost.exits)
        exits = [ExitResult(name=e.name, stage=e.stage, macs=e.macs, head_macs=e.head_macs,
                            cost_fraction=e.cost_fraction, val_accuracy=va, test_accuracy=ta,
                            test_overthinking=o)
                 for e, va, ta, o in zip(cost.exits, val.exit_accuracy, test.exit_accuracy, over,
                                         strict=True)]
        return cls(dataset=dataset, backbone=backbone, num_classes=num_classes,
                   backbone_macs=cost.backbone_macs, macs_convention=cost.convention,
                   input_size=list(cost.input_size), exits=exits, policy=policy, test=test,
                   val=val, config=config, **sections)

    def to_dict(self) -> dict:
        """The layout of ``results.json`` (keys in :data:`TOP_LEVEL_KEYS` order)."""
        version = self.format_version
        if isinstance(self.policy, dict) and "temperatures" in self.policy:
            version = max(version or 0, TEMPERATURES_FROM)  # older readers must refuse it
        d: dict[str, Any] = {
            "format_version": version, "eenet_version": self.eenet_version,
            "dataset": self.dataset, "backbone": self.backbone, "num_classes": self.num_classes,
            "backbone_macs": self.backbone_macs, "macs_convention": self.macs_convention,
            "input_size": list(self.input_size), "exits": [e.to_dict() for e in self.exits],
            "policy": self.policy, "test": self.test.section(),
            "val": self.val.section(extras=False),
            "config": self.config, "anytime": self.anytime, "objective": self.objective,
            "latency": self.latency, "wall_s": self.wall_s}
        d = {k: v for k, v in d.items() if v is not None}
        if self.training is not None:  # these keys are written even when null
            t = self.training
            d.update(splits=t.splits, epochs=t.epochs, best_checkpoint=t.best_checkpoint,
                     val_loss=self.val.loss, test_loss=self.test.loss,
                     resumed_from=t.resumed_from, world_size=t.world_size, mode=t.mode,
                     targets=t.targets, backbone_hash_before=t.backbone_hash_before,
                     backbone_hash_after=t.backbone_hash_after,
                     train_epoch_seconds=t.train_epoch_seconds)
            if t.segments is not None:
                d["training_segments"] = t.segments
        if self.evaluation is not None:
            e = self.evaluation
            d.update(run=e.run, target=e.target, calibration=e.calibration,
                     engine=e.engine.to_dict(), drop_vs_final_exit=e.drop_vs_final_exit)
        return {k: d[k] for k in TOP_LEVEL_KEYS if k in d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "results") -> "RunResults":
        """Read a results.json mapping; refuses (one line) one written by a newer eenet, and
        one whose entropy thresholds have the meaning of format 0 or 1."""
        check_readable(d, where)
        check_thresholds_readable(d, where)
        try:
            return cls._from_dict(d)
        except KeyError as exc:
            raise EENetError(f"{where} is not an eenet results file: {exc} is missing") from exc

    @classmethod
    def _from_dict(cls, d: dict) -> "RunResults":
        rows = [ExitResult.from_dict(e) for e in d["exits"]]
        over = [e.test_overthinking for e in rows]
        test = SplitResult.from_section(
            d["test"], exit_accuracy=[e.test_accuracy for e in rows],
            overthinking=over if all(o is not None for o in over) else None,
            loss=d.get("test_loss"))
        val = SplitResult.from_section(d["val"], exit_accuracy=[e.val_accuracy for e in rows],
                                       loss=d.get("val_loss"))
        training = evaluation = None
        if "epochs" in d:
            training = TrainingRecord(**{k: d[k] for k in _TRAINING_KEYS
                                         if k not in ("val_loss", "test_loss",
                                                      "training_segments")},
                                      segments=d.get("training_segments"))
        if "engine" in d:
            evaluation = EvaluationRecord(run=d["run"], target=d["target"],
                                          calibration=d["calibration"],
                                          engine=EngineResult.from_dict(d["engine"]),
                                          drop_vs_final_exit=d["drop_vs_final_exit"])
        return cls(dataset=d["dataset"], backbone=d["backbone"], num_classes=d["num_classes"],
                   backbone_macs=d["backbone_macs"], macs_convention=d["macs_convention"],
                   input_size=list(d["input_size"]), exits=rows, policy=d["policy"], test=test,
                   val=val, config=d["config"], training=training, evaluation=evaluation,
                   anytime=d.get("anytime"), objective=d.get("objective"),
                   latency=d.get("latency"), wall_s=d.get("wall_s"),
                   format_version=d.get("format_version"), eenet_version=d.get("eenet_version"))


def latency_section(latency: Any) -> dict:
    """results.json's ``latency`` as a mapping: ``{}`` when there is none, and the list that
    ``eenet-eval latency=true`` wrote before the key was always a mapping (the eager per-exit
    table) as ``{"exit_table": [...]}``."""
    if latency is None:
        return {}
    if isinstance(latency, list):
        return {"exit_table": latency}
    return latency


def check_readable(results: Any, where: str) -> None:
    """Raise (one line) unless ``results`` is a results mapping this eenet can read.

    A ``format_version`` above :data:`FORMAT_VERSION`, or a top-level key this eenet
    does not know, means a newer eenet wrote it: its keys may mean what this one
    cannot tell, so it is refused instead of half-read.
    """
    if not isinstance(results, dict):
        raise EENetError(f"{where} does not hold a results mapping")
    version = results.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise EENetError(f"{where}: format_version must be an integer >= 0, got {version!r}")
    unknown = sorted(set(results) - set(TOP_LEVEL_KEYS))
    if version > FORMAT_VERSION or unknown:
        keys = f"; keys it does not know: {', '.join(unknown)}" if unknown else ""
        raise EENetError(f"{where} was written by a newer eenet (format {version}, this eenet "
                         f"reads up to {FORMAT_VERSION}{keys}); upgrade eenet")


def check_thresholds_readable(results: dict, where: str) -> None:
    """Raise (one line) when ``results`` holds entropy thresholds with their old meaning.

    Before format 2 an entropy threshold was the entropy itself (leave when H < t;
    ``inf``: always leave); from format 2 it is in -H units like every policy's score
    (leave when -H > t; ``inf``: never leave). Checks the ``policy`` and the
    ``calibration``'s policy.
    """
    version = results.get("format_version", 0)
    if not isinstance(version, int) or version >= ENTROPY_AS_NEGATIVE_FROM:
        return
    names = {section.get("name" if key == "policy" else "policy")
             for key in ("policy", "calibration")
             if isinstance(section := results.get(key), dict)}
    if "entropy" in names:
        raise EENetError(f"{where} holds entropy thresholds of results format {version} (leave "
                         f"when the entropy H < t, inf: always leave), which this eenet reads as "
                         f"-H > t (inf: never leave); re-run eenet-eval (and eenet-export) for "
                         f"this run")


def read_policy(results: Any, where: str) -> tuple[str, list, list | None]:
    """The ``(name, thresholds, temperatures)`` of an eenet-eval results mapping, in this
    eenet's units: ``create_policy(*read_policy(results, where))`` is the policy the
    evaluation ran (``temperatures`` is None when it had none).

    Refuses in one line a file of a newer eenet (:func:`check_readable`), old entropy
    thresholds (:func:`check_thresholds_readable`) and a file without a policy.
    """
    check_readable(results, where)
    check_thresholds_readable(results, where)
    policy = results.get("policy")
    if not isinstance(policy, dict) or not isinstance(policy.get("name"), str) \
            or "thresholds" not in policy:
        raise EENetError(f"{where} is not an eenet-eval results.json (no policy with name and "
                         f"thresholds)")
    thresholds, temperatures = policy["thresholds"], policy.get("temperatures")
    return (policy["name"], list(thresholds) if isinstance(thresholds, list) else thresholds,
            list(temperatures) if isinstance(temperatures, list) else temperatures)


def trained_precision(config: Any) -> str:
    """The precision a run trained in, from its config (``results.json``'s ``config`` or its
    ``config.yaml``, as plain data): ``trainer.precision`` as eenet-train resolved it, and
    ``32-true`` (float32) for a config from before the key existed, which trained in float32."""
    trainer = config.get("trainer") if isinstance(config, dict) else None
    return str((trainer if isinstance(trainer, dict) else {}).get("precision", "32-true"))


def trained_on(run_dir: str | Path) -> str | None:
    """The machines that trained a run, as one line ("<cpu> (<n> cores)", a GPU named, each
    machine once, joined by " + "): from its ``results.json``'s ``training_segments`` (every
    process that trained it), else from a ``machine.json`` written beside it (runs trained
    before eenet-train recorded them); None when neither is there."""
    run_dir = Path(run_dir)
    res = run_dir / "results.json"
    segments = json.loads(res.read_text()).get("training_segments") if res.is_file() else None
    if not segments:
        path = run_dir / "machine.json"
        segments = [json.loads(path.read_text())] if path.is_file() else []
    names = [f"{s.get('cpu', '?')} ({s.get('cpu_count', '?')} cores)"
             + ("" if s.get("device", "cpu") == "cpu" else f", {s['device']}") for s in segments]
    return " + ".join(dict.fromkeys(names)) or None


def check_results_file(run_dir: str | Path) -> None:
    """Refuse a run folder whose ``results.json`` a newer eenet wrote (see :func:`check_readable`).

    A folder without the file passes: nothing in it is read when loading a run.
    """
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        return
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EENetError(f"cannot read {path}: {first_line(exc)}") from exc
    check_readable(results, str(run_dir))


def finished_run_results(run_dir: str | Path) -> dict:
    """A finished run's ``results.json``, read as data, for scripts that read runs back.

    Raises :class:`EENetError` (one line) while the run is still being trained (its
    ``INCOMPLETE`` marker is there), and when the file is missing, is not JSON, or has no
    per-exit figures (``exits``: a non-empty list, each with its ``test_accuracy``).
    """
    run_dir = Path(run_dir)
    if (run_dir / MARKER).exists():
        raise EENetError(f"{run_dir} is still being trained ({MARKER}): nothing to measure")
    try:
        results = json.loads((run_dir / "results.json").read_text())
        exits = results["exits"]
        if not exits or not all("test_accuracy" in e for e in exits):
            raise KeyError("exits")
        return results
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EENetError(f"{run_dir}/results.json cannot be read as a finished run's results "
                         f"({type(exc).__name__})") from None


def write_results(folder: str | Path, results: RunResults | dict) -> tuple[Path, Path]:
    """Write ``results.md`` and then ``results.json`` into ``folder``, each atomically:
    ``results.json`` last, so a folder holding it holds the report too."""
    folder = Path(folder)
    if isinstance(results, RunResults):
        results = results.to_dict()
    js, md = folder / "results.json", folder / "results.md"
    atomic_write_text(md, results_markdown(results) + "\n")
    atomic_write_text(js, json.dumps(results, indent=2, default=str) + "\n")
    return js, md
