"""The short CIFAR-10 recipe (conf/experiment/cifar10_recipe/): label smoothing, one-cycle, SGD.

Checked against closed forms (Szegedy et al. 2016's smoothed target; Smith & Topin 2019's
cycle as torch's OneCycleLR defines it), and each recipe experiment smoke-run end to end.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from eenet.config import compose_config
from eenet.config_checks import check_train_config
from eenet.errors import EENetError
from eenet.jobs.train import train
from eenet.runs import check_resume_config
from eenet.losses import MultiExitCE
from eenet.models.early_exit import ExitOutputs

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "eenet" / "conf" / "experiment"
                                  / "cifar10_recipe").glob("[!_]*.yaml"))


def outputs(logits):
    return ExitOutputs(list(logits), [torch.zeros(logits[0].shape[0]) for _ in logits])


def test_recipes_are_found():
    assert {"resnet20", "resnet8", "resnet20_sdn", "resnet20_branchynet", "resnet20_eenets",
            "trecx_resnet8"} <= set(RECIPES)


def test_label_smoothing_is_szegedys_smoothed_target():
    torch.manual_seed(0)
    z = [torch.randn(6, 5), torch.randn(6, 5)]
    y = torch.randint(0, 5, (6,))
    eps, w = 0.1, [0.3, 1.0]
    got = MultiExitCE(weights=w, label_smoothing=eps)(outputs(z), y, torch.tensor([0.4, 1.0]))
    want = 0.0
    for wi, zi in zip(w, z):
        target = (1 - eps) * F.one_hot(y, 5).float() + eps / 5  # Szegedy et al. 2016, sec. 7
        want = want + wi * float(-(target * zi.log_softmax(1)).sum(1).mean())
    assert math.isclose(float(got["loss"]), want, rel_tol=1e-6)
    plain = MultiExitCE(weights=w)(outputs(z), y, torch.tensor([0.4, 1.0]))["loss"]
    assert float(plain) == pytest.approx(sum(wi * float(F.cross_entropy(zi, y))
                                             for wi, zi in zip(w, z)), rel=1e-6)
    assert float(got["loss"]) != pytest.approx(float(plain), rel=1e-3)


def test_label_smoothing_survives_the_validation_copy_of_a_ramped_loss():
    loss = MultiExitCE(weights="cost", ramp_epochs=5, label_smoothing=0.2)
    assert loss.for_validation().label_smoothing == 0.2


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_label_smoothing_out_of_range_is_one_clear_error(eps):
    with pytest.raises(EENetError, match="label_smoothing must be in"):
        MultiExitCE(label_smoothing=eps)


def test_label_smoothing_is_off_outside_the_recipe():
    """eenet's loss configs do not name it (runs made before it existed resume unchanged)."""
    for overrides in ([], ["loss=multi_ce"], ["loss=sdn"], ["experiment=trecx_resnet8"]):
        cfg = compose_config(overrides, output_dir="unused")
        node = cfg.loss.first if "first" in cfg.loss else cfg.loss
        assert "label_smoothing" not in node, overrides
        loss = instantiate(cfg.loss)
        assert getattr(loss, "first", loss).label_smoothing == 0.0, overrides


def one_cycle_closed_form(s, total: int) -> list[float]:
    """Smith & Topin's linear one-cycle as torch's OneCycleLR lays it over ``total`` steps: up
    from max_lr / div_factor to max_lr until step pct_start * total - 1, then down to
    max_lr / (div_factor * final_div_factor) at step total - 1."""
    start, end = s.max_lr / s.div_factor, s.pct_start * total - 1
    low = start / s.final_div_factor
    return [start + (s.max_lr - start) * t / end if t <= end
            else s.max_lr + (low - s.max_lr) * (t - end) / (total - 1 - end) for t in range(total)]


class LearningRates(L.Callback):
    """The learning rate each optimizer step of a run used."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def small_recipe_run(train_config, data_root, *extra):
    return train_config(["experiment=cifar10_recipe/resnet8", "logger=none",
                         f"data_root={data_root.path}", "trainer.enable_progress_bar=false",
                         "dataset.datamodule.train_subset=600", "dataset.datamodule.val_size=100",
                         "dataset.datamodule.test_subset=100", "dataset.datamodule.batch_size=128",
                         "anytime=false", "threads=1", *extra])


def test_one_cycle_steps_after_every_optimizer_step_over_the_whole_run(train_config, data_root):
    """The cycle is laid over the run's optimizer steps (epochs x batches), as Smith & Topin
    define it, not over its epochs: every step has its own rate, and the last reaches the floor."""
    cfg = small_recipe_run(train_config, data_root, "trainer.max_epochs=3")
    rates = LearningRates()
    _, objects = train(cfg, extra_callbacks=[rates])
    trainer = objects["trainer"]
    steps = trainer.global_step
    batches = math.ceil(500 / 128)  # 600 images less the 100 of val, batches of 128
    assert steps == 3 * batches == trainer.estimated_stepping_batches
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step" and sched.scheduler.total_steps == steps
    assert rates.lrs == pytest.approx(one_cycle_closed_form(cfg.scheduler, steps), rel=1e-9)
    assert len(set(rates.lrs)) == steps  # within an epoch too: not a staircase


def test_cosine_per_step_fills_its_period_with_the_runs_steps(train_config):
    """The interval and the null length are the module's, not one-cycle's: cosine per optimizer
    step over the whole run (digits: 1,221 training samples, batches of 128 -> 10 per epoch)."""
    rates = LearningRates()
    cfg = train_config(["trainer.max_epochs=2", "trainer.enable_progress_bar=false",
                        "logger=none", "threads=1", "anytime=false", "+scheduler.interval=step",
                        "scheduler.T_max=null", "optimizer.lr=0.01"])
    _, objects = train(cfg, extra_callbacks=[rates])
    sched = objects["trainer"].lr_scheduler_configs[0]
    steps = objects["trainer"].global_step
    assert steps == 20 and sched.interval == "step" and sched.scheduler.T_max == steps
    # CosineAnnealingLR's closed form (eta_min 0): lr_t = lr (1 + cos(pi t / T)) / 2
    want = [0.01 * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]
    assert rates.lrs == pytest.approx(want, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("epochs", [8, 30])
def test_one_cycle_per_epoch_is_still_there_when_asked_for(epochs):
    cfg = compose_config(["experiment=cifar10_recipe/resnet20", f"trainer.max_epochs={epochs}",
                          "scheduler.interval=epoch"], output_dir="unused")
    check_train_config(cfg)
    node = OmegaConf.to_container(cfg.scheduler, resolve=True)
    node.pop("interval")
    opt = instantiate(cfg.optimizer)(params=[torch.zeros(1, requires_grad=True)])
    sched = instantiate(node)(optimizer=opt, total_steps=epochs)  # as the module fills it in
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(one_cycle_closed_form(cfg.scheduler, epochs), rel=1e-9)


def test_a_one_cycle_length_that_is_not_the_runs_is_one_clear_error(train_config, data_root):
    cfg = small_recipe_run(train_config, data_root, "trainer.max_epochs=2",
                           "scheduler.total_steps=5")  # the run has 2 x 4 = 8 steps
    with pytest.raises(EENetError, match="one-cycle schedule is 5 steps long but the run has 8"):
        train(cfg)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_with_the_cited_pieces(recipe):
    cfg = compose_config([f"experiment=cifar10_recipe/{recipe}"], output_dir="unused")
    check_train_config(cfg)
    assert cfg.dataset.name == "cifar10_jpeg"
    assert list(cfg.dataset.datamodule.augment) == ["crop", "hflip"]
    assert cfg.dataset.datamodule.crop_padding == 4
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.nesterov
    assert cfg.optimizer.weight_decay == 5e-4
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.OneCycleLR"
    assert cfg.scheduler.interval == "step" and cfg.scheduler.total_steps is None
    assert cfg.ema.decay == 0.998  # the weight average, chosen on val (experiments/README.md)
    # the cross-entropy terms are smoothed (EENets: its first, multi_ce stage)
    assert (cfg.loss.first if "first" in cfg.loss else cfg.loss).label_smoothing == 0.1


def test_cutout_is_one_override_on_any_recipe(tmp_path):
    """Cutout is not in the recipe; ``dataset.datamodule.augment=[crop,hflip,cutout]`` adds it
    (size 16, DeVries & Taylor's for CIFAR-10) and the training batches get it, eval not."""
    cfg = compose_config(["experiment=cifar10_recipe/resnet20",
                          "dataset.datamodule.augment=[crop,hflip,cutout]",
                          f"data_root={tmp_path}"], output_dir=str(tmp_path / "run"))
    check_train_config(cfg)
    dm = instantiate(cfg.dataset.datamodule)
    assert dm.train_transform.augment == ("crop", "hflip", "cutout")
    assert dm.train_transform.cutout_size == 16 and dm.eval_transform.augment == ()


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_end_to_end(train_config, recipe, data_root):
    cfg = train_config([f"experiment=cifar10_recipe/{recipe}", "debug=fdr", "logger=none",
                        f"data_root={data_root.path}", "trainer.enable_progress_bar=false",
                        "dataset.datamodule.train_subset=600", "dataset.datamodule.val_size=100",
                        "dataset.datamodule.test_subset=100", "anytime=false", "threads=1"])
    results, objects = train(cfg)
    assert results["test"]["n"] > 0
    module, trainer = objects["module"], objects["trainer"]
    loss = getattr(module.loss_fn, "first", module.loss_fn)  # EENets: the first stage
    assert loss.label_smoothing == 0.1
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.OneCycleLR)


def test_resuming_a_one_cycle_run_with_other_epochs_is_refused_before_anything_is_written(tmp_path):
    """trainer.max_epochs may change on resume (eenet.runs.RESUME_MAY_DIFFER), except under
    one-cycle, whose cycle was laid over the run's length when it started."""
    run = tmp_path / "run"
    run.mkdir()
    started = compose_config(["experiment=cifar10_recipe/resnet8", "trainer.max_epochs=3"],
                             output_dir=str(run))
    OmegaConf.save(started, run / "config.yaml", resolve=True)  # as eenet-train writes it
    before = sorted(p.name for p in run.iterdir())
    same = compose_config(["experiment=cifar10_recipe/resnet8", "trainer.max_epochs=3",
                           "resume=true"], output_dir=str(run))
    check_resume_config(same, run)  # its own length: accepted
    longer = compose_config(["experiment=cifar10_recipe/resnet8", "trainer.max_epochs=4",
                             "resume=true"], output_dir=str(run))
    with pytest.raises(EENetError, match="trainer.max_epochs=3 when it started"):
        check_resume_config(longer, run)
    assert sorted(p.name for p in run.iterdir()) == before
    cosine = compose_config(["trainer.max_epochs=3"], output_dir=str(run))
    OmegaConf.save(cosine, run / "config.yaml", resolve=True)
    check_resume_config(compose_config(["trainer.max_epochs=5", "resume=true"],
                                       output_dir=str(run)), run)  # other schedules may lengthen
