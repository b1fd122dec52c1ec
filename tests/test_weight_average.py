"""An exponential moving average of the weights (``+ema.decay=...``, eenet.jobs.train.weight_average)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import eenet.jobs.train as train_job
from eenet.config import compose_config
from eenet.config_checks import check_train_config
from eenet.errors import EENetError
from eenet.jobs.evaluate import evaluate
from eenet.jobs.train import train
from eenet.training.module import EarlyExitModule

BASE = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none", "threads=1",
        "loss=multi_ce", "anytime=false"]


class RawWeights(L.Callback):
    """The network's own (not averaged) floating-point state after every optimizer step."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().double().clone()
                            for k, v in pl_module.net.state_dict().items() if v.is_floating_point()})


def test_the_run_ends_with_the_moving_average_of_its_steps(train_config, tmp_path):
    decay = 0.9
    raw = RawWeights()
    # no checkpoint: what the run keeps is the trained network itself, the average at the end
    _, objects = train(train_config(BASE + [f"+ema.decay={decay}", "checkpoint.enabled=false"]),
                       extra_callbacks=[raw])
    assert len(raw.states) == objects["trainer"].global_step > 10
    # torch.optim.swa_utils: the first update copies the weights, then avg <- d avg + (1-d) w
    want = dict(raw.states[0])
    for state in raw.states[1:]:
        want = {k: decay * want[k] + (1 - decay) * state[k] for k in want}
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    eps = torch.finfo(torch.float32).eps
    for k, w in want.items():
        # float32 rounding of each of the n updates, at most eps times the values' size
        bound = 2 * len(raw.states) * eps * float(w.abs().max() + raw.states[-1][k].abs().max())
        assert float((got[k].double() - w).abs().max()) <= bound, k
    moved = [k for k in want if not torch.allclose(got[k].double(), raw.states[-1][k])]
    assert moved, "the kept weights are the last step's: no averaging happened"


class Crash(RuntimeError):
    pass


def test_a_crashed_and_resumed_averaged_run_equals_an_uninterrupted_one(train_config, tmp_path,
                                                                         monkeypatch):
    """The checkpoint carries the average and the raw weights; resuming restores both."""
    args = BASE + ["+ema.decay=0.95", "trainer.max_epochs=3"]
    straight, _ = train(train_config(args, output_dir=tmp_path / "straight"))
    original = EarlyExitModule.training_step

    def step(self, batch, batch_idx):  # digits: 10 steps an epoch; crash in the third
        if self.global_step == 25:
            raise Crash("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EarlyExitModule, "training_step", step)
    with pytest.raises(Crash):
        train(train_config(args, output_dir=tmp_path / "crashed"))
    monkeypatch.undo()
    resumed, _ = train(train_config(args + ["resume=true"], output_dir=tmp_path / "crashed"))
    assert resumed["resumed_from"].endswith("last.ckpt")
    # bit-identical as in tests/test_reliability.py: one thread, deterministic CPU kernels
    assert resumed["val"] == straight["val"] and resumed["test"] == straight["test"]
    w1 = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    w2 = torch.load(tmp_path / "crashed" / "model.pt", weights_only=True)
    assert [k for k in w1 if not torch.equal(w1[k], w2[k])] == []


@pytest.mark.parametrize("override, message", [
    ("+ema=0.99", "ema=0.99 must be null"),
    ("+ema.decay=1.0", "ema.decay=1.0 must be"),
    ("+ema.decay=0", "ema.decay=0 must be"),
])
def test_a_bad_average_is_one_clear_error(train_config, override, message):
    with pytest.raises(EENetError, match=message):
        check_train_config(train_config([override]))


def test_val_in_results_measures_the_kept_checkpoint_not_the_latest_average(train_config,
                                                                             tmp_path, monkeypatch):
    """The checkpoint kept is chosen on val (here the first epoch's, not the last one's);
    results.json's val must measure it, as its test and eenet-eval do, and not the average the
    callback holds at the end."""

    class FirstEpochBest(L.Callback):  # a val metric whose best epoch is the first
        def on_validation_epoch_end(self, trainer, pl_module):
            pl_module.log("val/first", float(-trainer.current_epoch))

    # the config check allows only the module's own val keys; this one is the test's
    checked = train_job.check_train_config
    monkeypatch.setattr(train_job, "check_train_config", lambda cfg: checked(
        OmegaConf.merge(cfg, {"checkpoint": {"monitor": "val/loss", "mode": "min"}})))
    saved, _ = train(train_config(BASE + ["trainer.max_epochs=3", "+ema.decay=0.5",
                                          "checkpoint.monitor=val/first", "checkpoint.mode=max"]),
                     extra_callbacks=[FirstEpochBest()])
    run = tmp_path / "run"
    ev = evaluate(compose_config([f"run={run}", "tolerance=1.0", "batch_size=512",
                                  "timing_passes=0", "threads=1"],
                                 output_dir=tmp_path / "eval", config_name="eval"))
    assert [e["val_accuracy"] for e in saved["exits"]] == [e["val_accuracy"] for e in ev["exits"]]
    assert [e["test_accuracy"] for e in saved["exits"]] == [e["test_accuracy"] for e in ev["exits"]]
