"""LightningModule that trains a backbone and its exits jointly.

EENets (Demir & Akbas) train the whole network end to end with a loss over all
exits (``eenet.losses``). The module receives built objects, as in the
lightning-hydra-template: the network, the loss, the per-exit cost fractions
(from ``eenet.cost``), and optimizer / scheduler factories (Hydra partials).

Each stage's epoch ends in a :class:`eenet.reporting.results.SplitResult`
(``last_metrics[stage]``, with the epoch's mean loss), the vocabulary of
``results.json``. Logged keys (torchmetrics, one metric object per stage,
reduced across processes under DDP; :data:`eenet.training.metrics.LOG_KEYS`):
``{stage}/loss`` (epoch mean; ``train/loss_step`` too), ``{stage}/exit{i}/acc``,
``{stage}/mixture_acc``, ``{stage}/expected_cost``, and under the exit policy
``{stage}/exit{i}/rate``, ``{stage}/acc``, ``{stage}/avg_cost``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Callable, Sequence

import lightning as L
import torch
from torchmetrics import MeanMetric

from eenet.errors import EENetError
from eenet.losses import ExitLoss
from eenet.models.early_exit import EarlyExitNetwork, ExitOutputs
from eenet.policies import ConfidencePolicy, ExitPolicy
from eenet.reporting.results import SplitResult
from eenet.training.metrics import ExitMetrics, flat_log_dict
from eenet.training.sync_bn import convert_batchnorm

STAGES = ("train", "val", "test")
SCHEDULER_INTERVALS = ("epoch", "step")
#: the keyword that holds a scheduler's length, filled in when its config leaves it null
SCHEDULER_LENGTH_KEYS = ("total_steps", "T_max")


def _float32(out: ExitOutputs) -> ExitOutputs:
    """``out`` with every floating tensor in float32 (autocast leaves bfloat16 or float16)."""
    if all(t.dtype in (torch.float32, torch.float64) for t in (*out.logits, *out.conf_logits)):
        return out
    return ExitOutputs([z.float() for z in out.logits], [c.float() for c in out.conf_logits])


class EarlyExitModule(L.LightningModule):
    """Joint training of an :class:`EarlyExitNetwork`.

    Args:
        net: the early-exit network.
        loss: an :class:`eenet.losses.ExitLoss`.
        cost_fractions: c_0..c_N from the network's cost table.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (a Hydra partial).
        scheduler: ``scheduler(optimizer) -> LRScheduler`` or ``None``.
        scheduler_interval: ``epoch`` (stepped once per epoch) or ``step`` (once per
            optimizer step, as one-cycle is defined: Smith & Topin 2019). A length the
            scheduler's config leaves ``null`` (``total_steps`` of OneCycleLR, ``T_max`` of
            CosineAnnealingLR) is filled in with the run's count of such steps.
        policy: exit policy for the thresholded metrics (default: confidence > 0.5).
        confidence_lr_scale: learning-rate factor for the confidence heads' parameters
            (a separate parameter group). Under Adam every weight of a head moves by
            about lr per step, so the logit of a head reading thousands of features
            can move by lr times their L1 norm per step and saturate the sigmoid for
            every sample (h_i = 1 everywhere, no routing); a small factor bounds that.
        sync_batchnorm: on several processes, normalise with the global batch's
            statistics (``eenet.training.sync_bn``), so W processes train what one
            process trains with the same global batch.
        freeze_backbone: post-training (PTEENet): the backbone's parameters do not
            train and it stays in eval mode while the exits train, so its BatchNorm
            running statistics do not move either (PTEENet's code left it in train
            mode, and they drifted). The final exit is the backbone's own classifier.
        targets: ``labels``, or ``backbone`` to train the exits to agree with the
            final exit's own predictions (no labels needed; PTEENet).
        channels_last: keep the network's 4-d weights and every 4-d input batch in
            channels-last (NHWC) memory order from setup on (the same function;
            oneDNN's NHWC convolutions are often faster on a CPU). Checkpoints and
            ``model.pt`` load into a network of either order.
    """

    def __init__(self, net: EarlyExitNetwork, loss: ExitLoss, cost_fractions: Sequence[float],
                 optimizer: Callable | None = None, scheduler: Callable | None = None,
                 policy: ExitPolicy | None = None, confidence_lr_scale: float = 1.0,
                 sync_batchnorm: bool = True, freeze_backbone: bool = False,
                 targets: str = "labels", scheduler_interval: str = "epoch",
                 channels_last: bool = False):
        super().__init__()
        if len(cost_fractions) != net.num_exits:
            raise ValueError(f"{len(cost_fractions)} cost fractions for {net.num_exits} exits")
        self.net = net
        self.loss_fn = loss
        self.register_buffer("cost_fractions", torch.tensor(list(cost_fractions)), persistent=False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise EENetError(f"unknown scheduler interval '{scheduler_interval}'; accepted: "
                             f"{', '.join(SCHEDULER_INTERVALS)}")
        self.scheduler_interval = scheduler_interval
        self.policy = policy or ConfidencePolicy(0.5)
        if not confidence_lr_scale > 0:
            raise EENetError(f"confidence_lr_scale must be > 0, got {confidence_lr_scale}")
        self.confidence_lr_scale = float(confidence_lr_scale)
        # one metric object per stage ("train" cannot be a ModuleDict key: Module.train exists)
        self.train_metrics = ExitMetrics(list(cost_fractions), self.policy)
        self.val_metrics = ExitMetrics(list(cost_fractions), self.policy)
        self.test_metrics = ExitMetrics(list(cost_fractions), self.policy)
        # epoch mean of the loss over every sample, reduced across processes
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.last_metrics: dict[str, SplitResult] = {}
        self.sync_batchnorm = sync_batchnorm
        if targets not in ("labels", "backbone"):
            raise EENetError(f"unknown targets '{targets}'; accepted: labels, backbone")
        self.targets = targets
        self.freeze_backbone = freeze_backbone
        self.channels_last = bool(channels_last)
        if freeze_backbone:
            for p in self.net.backbone.parameters():
                p.requires_grad_(False)
            self.net.backbone.eval()

    # Lightning sets modes by assignment as well as by .train(), so both are covered:
    # a frozen backbone stays in eval mode and its BatchNorm statistics do not move.
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.net.backbone.eval()
        return self

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.freeze_backbone and any(m.training for m in self.net.backbone.modules()):
            self.net.backbone.eval()

    def setup(self, stage: str) -> None:
        if self.sync_batchnorm and self.trainer.world_size > 1:
            on_gpu = self.trainer.strategy.root_device.type == "cuda"
            convert_batchnorm(self.net, use_torch_sync=on_gpu)
        if self.channels_last:  # here: before DDP wraps the network and the optimizer is made
            self.net.to(memory_format=torch.channels_last)

    def stage_metrics(self, stage: str) -> ExitMetrics:
        return getattr(self, f"{stage}_metrics")

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        self.loss_fn.set_epoch(self.current_epoch)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # a mixed trainer.precision (bf16-mixed, ...) runs the training steps under autocast;
        # validation and test stay in float32, so checkpoints are chosen and results.json
        # measured as eenet-eval measures; the losses and metrics always take float32 outputs
        with torch.autocast(x.device.type, enabled=False) if stage != "train" else nullcontext():
            out = _float32(self.net(x))
        target = out.logits[-1].detach().argmax(1) if self.targets == "backbone" else y
        # validation reports the schedule's final objective, comparable across epochs
        loss_fn = self.loss_fn if stage == "train" else self.loss_fn.for_validation()
        parts = loss_fn(out, target, self.cost_fractions)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise EENetError(
                f"non-finite {stage} loss ({loss.item()}) at epoch {self.current_epoch}, "
                f"global step {self.global_step}: training stopped; the last good checkpoint "
                f"is kept (lower the learning rate or lambda, or check the inputs)")
        self.stage_metrics(stage).update(out, y)
        getattr(self, f"{stage}_loss").update(loss.detach(), y.shape[0])
        if stage == "train":
            self.log("train/loss_step", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        loss_metric = getattr(self, f"{stage}_loss")
        values = replace(self.stage_metrics(stage).compute(), loss=float(loss_metric.compute()))
        self.stage_metrics(stage).reset()
        loss_metric.reset()
        self.last_metrics[stage] = values
        logged = flat_log_dict(stage, values)
        self.log(f"{stage}/acc", logged.pop(f"{stage}/acc"), prog_bar=True)
        self.log(f"{stage}/loss", logged.pop(f"{stage}/loss"), prog_bar=True)
        self.log_dict(logged)

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured")
        trainable = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        conf = [p for n, p in trainable if ".confidence." in n]
        rest = [p for n, p in trainable if ".confidence." not in n]
        if self.confidence_lr_scale == 1.0 or not conf:
            params = [p for _, p in trainable]
        else:
            base = self.optimizer_factory(params=[torch.zeros(1, requires_grad=True)])
            lr = base.param_groups[0]["lr"]
            params = [{"params": rest},
                      {"params": conf, "lr": lr * self.confidence_lr_scale}]
        opt = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt,
                                                                     **self._scheduler_length()),
                                 "interval": self.scheduler_interval}}

    def _run_length(self) -> int:
        """The count of scheduler steps in the whole run: epochs, or optimizer steps."""
        if self.scheduler_interval == "epoch":
            return int(self.trainer.max_epochs)
        return int(self.trainer.estimated_stepping_batches)

    def _scheduler_length(self) -> dict[str, int]:
        """The length keywords the scheduler's config left null, as the run's step count."""
        given = getattr(self.scheduler_factory, "keywords", {})
        return {k: self._run_length() for k in SCHEDULER_LENGTH_KEYS
                if k in given and given[k] is None}

    def on_train_start(self) -> None:
        # A resumed run's scheduler comes back from the checkpoint with the length it started
        # with; one-cycle cannot run past it (torch raises at the step after), and a longer
        # run would leave the learning rate at its floor. Refuse it in one line, here.
        for conf in self.trainer.lr_scheduler_configs:
            length = getattr(conf.scheduler, "total_steps", None)
            if length is not None and length != self._run_length():
                raise EENetError(
                    f"the one-cycle schedule is {length} {self.scheduler_interval}s long but the "
                    f"run has {self._run_length()}: leave scheduler.total_steps null (the run's "
                    f"length), and resume a run with its own trainer.max_epochs")
