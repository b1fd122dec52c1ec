"""Resume after a crash, atomic checkpoints, safe loading, non-finite loss guard."""

from __future__ import annotations

import pickle

import pytest
import torch

from eenet.errors import EENetError
from eenet.jobs.train import train
from eenet.io import safe_torch_load
from eenet.training.checkpoint import SafeCheckpointIO
from eenet.training.module import EarlyExitModule

BASE = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false", "logger=none",
        "dataset.datamodule.augment=[crop]", "threads=1", "loss=eenet_v2"]


class Crash(RuntimeError):
    pass


def crash_at(monkeypatch, global_step: int):
    original = EarlyExitModule.training_step

    def step(self, batch, batch_idx):
        if self.global_step == global_step:
            raise Crash(f"simulated crash at step {global_step}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EarlyExitModule, "training_step", step)


def test_crash_then_resume_equals_an_uninterrupted_run(train_config, tmp_path, monkeypatch):
    straight, _ = train(train_config(BASE, output_dir=tmp_path / "straight"))
    crashed = tmp_path / "crashed"
    # digits: 1,221 training samples, batch 128 -> 10 steps per epoch; crash mid-epoch 2
    crash_at(monkeypatch, 25)
    with pytest.raises(Crash):
        train(train_config(BASE, output_dir=crashed))
    monkeypatch.undo()
    assert (crashed / "checkpoints" / "last.ckpt").is_file()
    assert not (crashed / "results.json").exists()
    resumed, _ = train(train_config(BASE + ["resume=true"], output_dir=crashed))
    assert resumed["resumed_from"].endswith("last.ckpt")
    # No tolerance: on the CPU with one thread every kernel is deterministic, the batches and
    # augmentations of epoch e depend only on (seed, e), and the checkpoint restores the
    # weights, the optimizer's and scheduler's state and the epoch, so the resumed run does
    # the same float operations as the straight one and ends bit-identical (as measured).
    for split in ("val", "test"):
        assert resumed[split] == straight[split]
    assert resumed["val_loss"] == straight["val_loss"]
    w1 = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    w2 = torch.load(crashed / "model.pt", weights_only=True)
    assert w1.keys() == w2.keys()
    assert [k for k in w1 if not torch.equal(w1[k], w2[k])] == []
    # the record keeps both processes: the crashed one's epochs 0-1 (up to its last
    # checkpoint, saved after epoch 1's validation) and the resumed one's epoch 2; every
    # epoch's seconds, and the wall time of both
    first, second = resumed["training_segments"]
    assert first["epochs"] == [0, 1] and second["epochs"] == [2, 2]
    assert len(resumed["train_epoch_seconds"]) == len(straight["train_epoch_seconds"]) == 3
    assert resumed["wall_s"] == first["wall_s"] + second["wall_s"]
    assert [len(s["training_segments"]) for s in (straight, resumed)] == [1, 2]


def test_resume_without_a_checkpoint_is_a_clear_error(train_config, tmp_path):
    with pytest.raises(EENetError, match="resume=true but .*last.ckpt does not exist"):
        train(train_config(BASE + ["resume=true"], output_dir=tmp_path / "new"))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        train_config, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    from eenet import losses

    original = losses.EENetLoss.forward

    def forward(self, outputs, target, cost_fractions):
        parts = original(self, outputs, target, cost_fractions)
        if torch.is_grad_enabled():  # training steps only
            if getattr(self, "_train_calls", 0) == 14:
                parts["loss"] = parts["loss"] * float("nan")
            self._train_calls = getattr(self, "_train_calls", 0) + 1
        return parts

    monkeypatch.setattr(losses.EENetLoss, "forward", forward)
    with pytest.raises(EENetError, match=r"non-finite train loss \(nan\) at epoch 1, global step 14"):
        train(train_config(BASE, output_dir=out))
    last = out / "checkpoints" / "last.ckpt"
    ckpt = safe_torch_load(last)
    assert ckpt["epoch"] == 0  # the checkpoint of the last finished epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resume_from_a_malicious_checkpoint_is_refused_before_anything_runs(train_config, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    out = tmp_path / "run"
    with pytest.raises(EENetError, match="cannot load .*evil.ckpt safely"):
        train(train_config(BASE + [f"ckpt_path={evil}"], output_dir=out))
    assert not marker.exists()
    assert not out.exists()
