"""The training job: train an early-exit network from a composed config, write its run folder.

``train(cfg)`` is a plain function (tests, experiment scripts and users' code
call it with a config from :func:`eenet.config.compose_config`); the command
``eenet-train`` (:mod:`eenet.cli.train`) only composes the config and prints. Order of work: build and check every
object first (data, backbone, exits, cost table, loss, policy), so that a bad
configuration fails with one line before anything is written; then train,
reload the best checkpoint (chosen on the validation split, never on test),
evaluate on val and test, and write into the run's output folder:

- ``config.yaml``: the resolved configuration of the run;
- ``model.pt``: the network's plain ``state_dict`` (load with ``weights_only=True``);
- ``cost.json``: the fvcore per-exit cost table;
- ``results.json`` and ``results.md``: see :mod:`eenet.reporting.results`.

The folder is claimed through :mod:`eenet.run_folder` once everything is built: a
folder that holds a run (finished, or started and stopped: ``INCOMPLETE`` is there)
is refused unless ``resume=true`` continues it (same configuration, but for
:data:`eenet.runs.RESUME_MAY_DIFFER`) or ``overwrite=true`` replaces it. The
``INCOMPLETE`` marker (and lock) comes first, ``results.json`` after every other
file, the marker goes last.

Usage::

    eenet-train                                   # resnet20 + 2 exits on the bundled digits
    eenet-train dataset=mnist trainer.max_epochs=5 loss.lambda_coef=0.5
    eenet-train -m loss.lambda_coef=0.5,1,2       # a sweep, one folder per job
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from eenet.calibration import Calibrator, anytime_view, cache_exit_outputs
from eenet.config import instantiate
from eenet.cost import CostTable, exit_cost_table
from eenet.data.batching import make_loader
from eenet.errors import EENetError
from eenet.config_checks import check_train_config
from eenet.io import atomic_write, atomic_write_text, safe_torch_load
from eenet.models.early_exit import EarlyExitNetwork
from eenet.models.weights import state_hash
from eenet.policies import create_policy
from eenet.reporting.experiment import run_machine
from eenet.reporting.results import RunResults, TrainingRecord, write_results
from eenet.reporting.wandb import finish_wandb_run, log_training_results
from eenet.run_folder import claim_output_folder
from eenet.runs import build_network, check_resume_config
from eenet.training.checkpoint import EpochSeed, EpochTimer, SafeCheckpointIO
from eenet.training.module import EarlyExitModule

log = logging.getLogger("eenet")

# Lightning 2.6 on torch 2.14 warns about a torch-internal deprecation on every fit
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


#: What eenet-train writes into its folder: a folder holding any of it holds a run.
OUTPUTS = ("config.yaml", "cost.json", "model.pt", "results.json", "results.md", "checkpoints",
           "csv")


class _NoAdvertising(logging.Filter):
    """Drops Lightning's "💡 Tip: ... litlogger" line, an advertisement printed on every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


# Lightning logs it through the rank-zero logger of lightning.pytorch or lightning.fabric
# (whichever was imported last names it)
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _NoAdvertising) for f in _logger.filters):
        _logger.addFilter(_NoAdvertising())


def process_rank() -> int:
    """This process's rank as set by the DDP launcher (0 before the launch and when alone)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def _resume_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint to resume from (``ckpt_path=`` or ``resume=true``), checked to load safely."""
    path = cfg.get("ckpt_path")
    if cfg.get("resume") and not path:
        path = out_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise EENetError(f"resume=true but {path} does not exist; resume the run in its own "
                             f"folder: hydra.run.dir=<the run's output folder>")
    if path:
        safe_torch_load(path)  # a bad or unsafe checkpoint stops here, before anything is written
        return str(path)
    return None


def _config_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _load_best(module: EarlyExitModule, ckpt_path: str | None) -> None:
    if ckpt_path and Path(ckpt_path).is_file():
        module.load_state_dict(safe_torch_load(ckpt_path)["state_dict"])


def _scheduler(cfg: DictConfig) -> tuple[Any, str]:
    """The scheduler's factory (None without one) and its interval (``scheduler.interval``,
    ``epoch`` when absent): the interval is the trainer's, not the scheduler's keyword."""
    node = cfg.get("scheduler")
    if not node:
        return None, "epoch"
    node = OmegaConf.to_container(node, resolve=True)
    interval = node.pop("interval", "epoch")
    return instantiate(node, "scheduler"), interval


def _build(cfg: DictConfig, rank: int, out_dir: Path) -> dict[str, Any]:
    """Every object of a run, checked; raises before anything is written."""
    mode = cfg.get("mode", "joint")  # checked by check_train_config
    datamodule = instantiate(cfg.dataset.datamodule, "dataset")
    datamodule.prepare_data()
    datamodule.setup("fit")
    input_size = tuple(datamodule.input_size)
    cost_file = out_dir / "cost.json"
    if rank > 0 and cost_file.is_file():  # DDP: rank 0 traced the costs before the launch
        cost = CostTable.from_dict(json.loads(cost_file.read_text()))
        net = build_network(cfg, input_size, stages=[e.stage for e in cost.exits[:-1]])
    else:
        net = build_network(cfg, input_size)
        cost = exit_cost_table(net, input_size)
    loss = instantiate(cfg.loss, "loss")
    loss.check(net.num_exits)
    policy = create_policy(cfg.policy.name, cfg.policy.thresholds)
    policy.threshold_vector(net.num_exits - 1)  # checks the count of per-exit thresholds
    scheduler, interval = _scheduler(cfg)
    module = EarlyExitModule(net, loss, cost.fractions,
                             optimizer=instantiate(cfg.optimizer, "optimizer"),
                             scheduler=scheduler, scheduler_interval=interval,
                             policy=policy,
                             confidence_lr_scale=float(cfg.get("confidence_lr_scale", 1.0)),
                             sync_batchnorm=bool(cfg.get("sync_batchnorm", True)),
                             channels_last=bool(cfg.get("channels_last", False)),
                             freeze_backbone=mode == "posttrain",
                             targets=cfg.get("targets", "labels"))
    ckpt_path = _resume_path(cfg, out_dir)
    return {"mode": mode, "datamodule": datamodule, "net": net, "cost": cost, "policy": policy,
            "module": module, "ckpt_path": ckpt_path, "backbone_hash": state_hash(net.backbone)}


def weight_average(decay: float) -> L.Callback:
    """An exponential moving average of the weights, updated after every optimizer step
    (Polyak & Juditsky 1992; per-step EMA as in Tan & Le, "EfficientNet", 2019, sec. 5.2):
    validation, the checkpoints (their ``state_dict``; the raw weights ride along for
    resuming) and the test use the average. BatchNorm statistics are averaged too."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return EMAWeightAveraging(decay=decay)


def native_bfloat16(accelerator: str | None) -> bool:
    """Whether the device the trainer will take multiplies bfloat16 natively: a CUDA GPU that
    supports it (``accelerator`` auto, gpu or cuda, with one here), or on the CPU, AMX tiles
    (Intel Xeon since Sapphire Rapids), where ``bf16-mixed`` trained the CIFAR-10 recipe's
    resnet20 1.8x faster than float32 on one thread
    (experiments/bench/bench_precision.py). CPUs with AVX512-BF16 alone are not taken: not
    measured here."""
    if accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    if accelerator not in (None, "auto", "cpu"):
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: guarded
    return bool(amx and amx())


def resolve_precision(cfg: DictConfig) -> None:
    """``trainer.precision=auto``: ``bf16-mixed`` where :func:`native_bfloat16`, else
    ``32-true``, written into ``cfg`` (so config.yaml records what ran)."""
    if cfg.trainer.get("precision") == "auto":
        with open_dict(cfg):
            cfg.trainer.precision = ("bf16-mixed" if native_bfloat16(cfg.trainer.get("accelerator"))
                                     else "32-true")


def _make_trainer(cfg: DictConfig, out_dir: Path, extra_callbacks: list, started: float
                  ) -> tuple[L.Trainer, Any, list, EpochTimer]:
    """The Lightning trainer with eenet's callbacks, safe checkpoint I/O and the loggers."""
    group = _sweep_group()
    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        extra = {"group": group} if key == "wandb" and group and not node.get("group") else {}
        lg = instantiate(node, "logger", **extra)
        if lg is not None:
            loggers.append(lg)
    epoch_timer = EpochTimer(machine=run_machine(), started=started)  # who trains the run
    callbacks: list = [EpochSeed(int(cfg.seed)), epoch_timer, *extra_callbacks]
    ema = cfg.get("ema")
    if ema:  # an exponential moving average of the weights (and BatchNorm statistics)
        callbacks.append(weight_average(float(ema.decay)))
    ckpt_cb = None
    if cfg.checkpoint.enabled:
        ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=str(out_dir / "checkpoints"), filename="best", monitor=cfg.checkpoint.monitor,
            mode=cfg.checkpoint.mode, save_last=True, save_top_k=1)
        callbacks.append(ckpt_cb)
    trainer = instantiate(cfg.trainer, "trainer", logger=loggers or False, callbacks=callbacks,
                           default_root_dir=str(out_dir), enable_checkpointing=ckpt_cb is not None,
                           plugins=[SafeCheckpointIO()])
    return trainer, ckpt_cb, loggers, epoch_timer


def _after_training_views(cfg: DictConfig, net: EarlyExitNetwork, datamodule, cost: CostTable
                          ) -> tuple[dict | None, dict | None]:
    """The anytime view and the sweepers' validation objective (each None when not asked
    for), from cached exit outputs."""
    anytime = objective = None
    want_anytime = cfg.get("anytime", True) and net.num_exits > 1
    budget = cfg.get("objective_budget")
    if not (want_anytime or budget):
        return anytime, objective
    val_cache = cache_exit_outputs(net, make_loader(datamodule.val_dataset, 512, shuffle=False))
    if want_anytime:  # the anytime / budget view and the accuracy-versus-cost curve
        test_cache = cache_exit_outputs(net, make_loader(datamodule.test_dataset, 512,
                                                         shuffle=False))
        anytime = anytime_view(val_cache, test_cache, cfg.policy.name, cost)
    if budget:  # a validation-only objective for sweepers: accuracy within a cost budget
        res = Calibrator(val_cache, cfg.policy.name, cost).calibrate(budget=budget)
        objective = {"budget": float(budget), "reachable": res.reachable,
                     "val_accuracy": res.chosen.accuracy if res.reachable else 0.0,
                     "val_cost": res.chosen.avg_cost}
    return anytime, objective


def train(cfg: DictConfig, extra_callbacks: list | None = None) -> tuple[dict, dict[str, Any]]:
    """Train, evaluate and write a run; returns ``(results, objects)``.

    ``results`` is the mapping written to ``results.json``
    (:meth:`eenet.reporting.results.RunResults.to_dict`; ``RunResults.from_dict``
    gives the typed object back).

    ``extra_callbacks`` are added to the Lightning trainer's callbacks (probes,
    custom logging) for callers that use ``train`` as a library function.
    ``objects`` holds the built ``datamodule``, ``net``, ``module``, ``trainer``
    and ``cost`` table for callers that want to go on with them.
    """
    started = time.time()
    check_train_config(cfg)
    resolve_precision(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out_dir = Path(cfg.output_dir)
    if cfg.get("data_root"):  # saved configs must not depend on the folder they ran from
        with open_dict(cfg):
            cfg.data_root = str(Path(cfg.data_root).resolve())
    rank = process_rank()
    devices = cfg.trainer.get("devices", 1)
    if not cfg.get("threads") and isinstance(devices, int) and devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))

    # 1. build and check everything, the output folder last; nothing is written before
    b = _build(cfg, rank, out_dir)
    folder = None
    if rank == 0:  # DDP: the other ranks write nothing of the folder's
        if cfg.get("resume"):
            check_resume_config(cfg, out_dir)
        folder = claim_output_folder(out_dir, "eenet-train", OUTPUTS, key="hydra.run.dir",
                                     others_allowed=True, restart_incomplete=False,
                                     overwrite=bool(cfg.get("overwrite")),
                                     resume=bool(cfg.get("resume")))
    # an exception leaves the folder marked INCOMPLETE (or removes it if nothing was written)
    with folder or contextlib.nullcontext():
        return _train_and_write(cfg, b, out_dir, folder, list(extra_callbacks or []), started)


def _train_and_write(cfg: DictConfig, b: dict[str, Any], out_dir: Path, folder,
                     extra_callbacks: list, started: float) -> tuple[dict, dict[str, Any]]:
    net, datamodule, cost, module = b["net"], b["datamodule"], b["cost"], b["module"]
    log.info("exits after stages %s\n%s", net.exit_stages, cost.to_markdown())

    # 2. train
    config = _config_dict(cfg)
    trainer, ckpt_cb, loggers, epoch_timer = _make_trainer(cfg, out_dir, extra_callbacks, started)
    if folder is not None:
        folder.clear(OUTPUTS)  # overwrite=true: the earlier run's files go
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_text(out_dir / "cost.json", json.dumps(cost.to_dict(), indent=2) + "\n")
    for lg in loggers:
        lg.log_hyperparams(config)
    trainer.fit(module, datamodule=datamodule, ckpt_path=b["ckpt_path"])

    # 3. evaluate the checkpoint chosen on val, on val and on test. Its state_dict holds the
    # averaged weights already (weight_average); the averaging callback would swap its latest
    # average in for the validation, so val would measure other weights than test and model.pt
    if ckpt_cb is not None:
        _load_best(module, ckpt_cb.best_model_path)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    val, test = module.last_metrics["val"], module.last_metrics["test"]

    # 4. write (one process)
    results = RunResults.build(
        dataset=cfg.dataset.name, backbone=cfg.backbone.name, num_classes=net.num_classes,
        cost=cost, val=val, test=test, policy=b["policy"].describe(), config=config,
        training=TrainingRecord(
            splits=getattr(datamodule, "split_sizes", None), epochs=trainer.current_epoch,
            best_checkpoint=ckpt_cb.best_model_path if ckpt_cb else None,
            resumed_from=b["ckpt_path"], world_size=trainer.world_size, mode=b["mode"],
            targets=cfg.get("targets", "labels"), backbone_hash_before=b["backbone_hash"],
            backbone_hash_after=state_hash(net.backbone),
            train_epoch_seconds=epoch_timer.seconds))
    if trainer.is_global_zero:
        results.anytime, results.objective = _after_training_views(cfg, net, datamodule, cost)
    # every process that trained the run (a resumed run's earlier ones from its checkpoint),
    # and the wall time of them all
    results.training.segments = epoch_timer.segments
    results.wall_s = sum(seg["wall_s"] for seg in results.training.segments)
    saved = results.to_dict()
    if trainer.is_global_zero:
        atomic_write(out_dir / "model.pt", lambda f: torch.save(net.state_dict(), f))
        for lg in loggers:
            log_training_results(lg, saved)
    for lg in loggers:
        finish_wandb_run(lg)
    if trainer.is_global_zero:
        write_results(out_dir, saved)  # last: the run is complete once it is there
    return saved, {"datamodule": datamodule, "net": net, "module": module,
                   "trainer": trainer, "cost": cost}


def _sweep_group() -> str | None:
    """Under ``-m``, the sweep folder's name: W&B groups the runs of one sweep by it."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def objective(results: dict) -> float:
    """What ``eenet-train`` returns to Hydra sweepers (Optuna): never a test figure.

    With ``objective_budget=B``: validation accuracy at thresholds chosen on val for an
    average cost fraction <= B (0 when B is unreachable); otherwise the validation
    accuracy under the configured policy.
    """
    if "objective" in results:
        return results["objective"]["val_accuracy"]
    return results["val"]["accuracy"]
