"""``trainer.precision``: a mixed precision runs the training steps under autocast while
validation and test stay in float32; ``auto`` picks bfloat16 only where the hardware multiplies
it natively and config.yaml records the choice; the setting may change on resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import eenet.jobs.train as train_job
from eenet.config import compose_config
from eenet.config_checks import check_train_config
from eenet.errors import EENetError
from eenet.jobs.train import native_bfloat16, resolve_precision, train
from eenet.reporting.results import trained_precision
from eenet.runs import check_resume_config

BASE = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none", "threads=1",
        "anytime=false", "trainer.accelerator=cpu"]


class Dtypes(L.Callback):
    """The dtype of the first conv's output in each loop (train, validate, test)."""

    def __init__(self):
        self.seen: dict[str, set] = {"train": set(), "val": set(), "test": set()}
        self.phase = None

    def setup(self, trainer, pl_module, stage):
        conv = next(m for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out: self.seen[self.phase].add(out.dtype)
                                   if self.phase else None)

    def on_train_batch_start(self, *args):
        self.phase = "train"

    def on_validation_batch_start(self, *args):
        self.phase = "val"

    def on_test_batch_start(self, *args):
        self.phase = "test"


@pytest.mark.parametrize("precision,trained", [("bf16-mixed", torch.bfloat16),
                                               ("32-true", torch.float32)])
def test_training_steps_run_in_the_precision_asked_and_evaluation_in_float32(
        train_config, tmp_path, precision, trained):
    dtypes = Dtypes()
    cfg = train_config(BASE + [f"trainer.precision={precision}"])
    results, _ = train(cfg, extra_callbacks=[dtypes])
    assert dtypes.seen == {"train": {trained}, "val": {torch.float32}, "test": {torch.float32}}
    assert results["test"]["accuracy"] > 0.5  # 10 classes: it learned in either precision
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["trainer"]["precision"] == precision


@pytest.mark.parametrize("amx,cuda,accelerator,expected", [
    (True, False, "auto", "bf16-mixed"), (True, False, "cpu", "bf16-mixed"),
    (False, False, "auto", "32-true"), (True, False, "mps", "32-true"),
    (False, True, "auto", "bf16-mixed"), (False, True, "cpu", "32-true")])
def test_auto_takes_bfloat16_only_where_the_hardware_has_it(monkeypatch, amx, cuda, accelerator,
                                                            expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert native_bfloat16(accelerator) is (expected == "bf16-mixed")
    cfg = compose_config(BASE + ["trainer.precision=auto", f"trainer.accelerator={accelerator}"],
                         output_dir="unused")
    resolve_precision(cfg)
    assert cfg.trainer.precision == expected


def test_auto_is_written_as_what_it_chose(train_config, tmp_path, monkeypatch):
    monkeypatch.setattr(train_job, "native_bfloat16", lambda accelerator: False)
    train(train_config(BASE + ["trainer.precision=auto", "trainer.max_epochs=1"]))
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.trainer.precision == "32-true"


def test_precision_may_change_on_resume_and_must_be_known(tmp_path):
    """A run started before the key existed (no trainer.precision in its config.yaml) resumes
    in bf16-mixed; another difference (the seed) is still refused."""
    run = tmp_path / "run"
    run.mkdir()
    started = compose_config(["experiment=cifar10_recipe/resnet20"], output_dir=str(run))
    saved = OmegaConf.to_container(started, resolve=True)
    del saved["trainer"]["precision"]
    OmegaConf.save(OmegaConf.create(saved), run / "config.yaml")
    check_resume_config(compose_config(["experiment=cifar10_recipe/resnet20", "resume=true",
                                        "trainer.precision=bf16-mixed"], output_dir=str(run)), run)
    with pytest.raises(EENetError, match="seed"):
        check_resume_config(compose_config(["experiment=cifar10_recipe/resnet20", "seed=1",
                                            "resume=true"], output_dir=str(run)), run)
    with pytest.raises(EENetError, match="trainer.precision") as err:
        check_train_config(compose_config(BASE + ["trainer.precision=bf17"], output_dir=str(run)))
    assert "\n" not in str(err.value) and "auto" in str(err.value)


@pytest.mark.parametrize("config, expected", [
    ({"trainer": {"precision": "bf16-mixed"}}, "bf16-mixed"),
    ({"trainer": {"precision": "32-true"}}, "32-true"),
    ({"trainer": {"max_epochs": 3}}, "32-true"),  # a config from before the key: float32
    ({"trainer": None}, "32-true"), ({}, "32-true")])
def test_trained_precision_reads_a_run_config_as_data(config, expected):
    """The one reader of the precision a run trained in (tables' rows and the recipe report)."""
    assert trained_precision(config) == expected
