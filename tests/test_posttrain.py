"""Post-training (PTEENet): exits train on a frozen backbone that stays bit-identical."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eenet.calibration import cache_exit_outputs
from eenet.data.batching import make_loader
from eenet.data.datamodule import ClassificationDataModule
from eenet.errors import EENetError
from eenet.models.weights import load_backbone_weights, state_hash
from eenet.jobs.train import train

QUICK = ["trainer.enable_progress_bar=false", "logger=none", "checkpoint.enabled=false"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    from eenet.config import compose_config

    out = tmp_path_factory.mktemp("plain")
    train(compose_config(QUICK + ["trainer.max_epochs=3", "placement.method=explicit",
                                  "placement.stages=[]", "loss=multi_ce"], output_dir=out))
    return out


def test_posttrain_keeps_the_backbone_bit_identical(plain_run, train_config):
    cfg = train_config(QUICK + ["trainer.max_epochs=3", "mode=posttrain", "exit=pteenet",
                                f"backbone.checkpoint={plain_run}", "loss=multi_ce",
                                "placement.method=explicit", "placement.stages=[1,4]"])
    before = {k[len("backbone."):]: v for k, v in
              torch.load(plain_run / "model.pt", weights_only=True).items()}
    results, objects = train(cfg)
    net = objects["net"]
    after = {k[len("backbone."):]: v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    assert set(after) == set(before)
    for k in before:  # weights and BatchNorm running statistics, to the bit
        assert torch.equal(before[k], after[k]), k
    assert results["backbone_hash_before"] == results["backbone_hash_after"]
    assert results["mode"] == "posttrain"
    # the branches did train (chance is 10%; pooled 8x8 features make exit 0 the weaker one)
    accs = [e["test_accuracy"] for e in results["exits"]]
    assert accs[0] > 0.15 and accs[1] > 0.5, accs
    # the final exit is the backbone's own classifier: the same test accuracy as the plain run
    plain = json.loads((plain_run / "results.json").read_text())
    assert results["exits"][-1]["test_accuracy"] == plain["exits"][-1]["test_accuracy"]


def test_joint_training_does_change_the_backbone(plain_run, train_config):
    """The hash check can fail: a joint run from the same checkpoint moves the backbone."""
    cfg = train_config(QUICK + ["trainer.max_epochs=1", "mode=mixed",
                                f"backbone.checkpoint={plain_run}"])
    results, _ = train(cfg)
    assert results["backbone_hash_before"] != results["backbone_hash_after"]


def agreement_with_the_backbone(objects):
    """Per early exit, on the test split (true labels, never garbled): the share of samples
    where it predicts the backbone's class, and the share expected if the two were
    independent (sum_c p_exit(c) p_backbone(c), from their own class frequencies)."""
    net, dm = objects["net"], objects["datamodule"]
    cached = cache_exit_outputs(net, make_loader(dm.test_dataset, 512, shuffle=False))
    preds = [lg.argmax(1) for lg in cached.logits]
    n, k = len(cached), net.num_classes
    backbone = torch.bincount(preds[-1], minlength=k).double() / n
    return n, [(float((p == preds[-1]).double().mean()),
                float(backbone @ (torch.bincount(p, minlength=k).double() / n))) for p in preds[:-1]]


def test_backbone_targets_train_without_labels(plain_run, train_config, monkeypatch, tmp_path):
    """With every training label replaced by noise, exits trained on the backbone's own
    predictions still learn them; exits trained on the labels learn nothing (the control
    shows the noise really reached the training: without it they agree as well)."""
    real_load = ClassificationDataModule._load

    def garbled(self, train, select=None):
        images, labels = real_load(self, train, select)
        if train:  # the training split (train and val): labels independent of the images
            labels = torch.randint(0, 10, labels.shape, generator=torch.Generator().manual_seed(0))
        return images, labels

    monkeypatch.setattr(ClassificationDataModule, "_load", garbled)
    runs = {}
    for targets in ("backbone", "labels"):
        cfg = train_config(QUICK + ["trainer.max_epochs=2", "mode=posttrain", f"targets={targets}",
                                    f"backbone.checkpoint={plain_run}", "loss=multi_ce"],
                           output_dir=tmp_path / targets)
        results, objects = train(cfg)
        assert results["targets"] == targets
        assert results["backbone_hash_before"] == results["backbone_hash_after"]
        n, runs[targets] = agreement_with_the_backbone(objects)
    # margins of 10 binomial standard errors (sqrt(p (1 - p) / n); of the difference of two
    # shares, their root sum of squares); measured: 0.89 / 0.89 agreement against a chance
    # level of 0.10 (SE 0.016) and a control of 0.16 / 0.18 (SE of the gap 0.025)
    for (agree, chance), (control, _) in zip(runs["backbone"], runs["labels"]):
        se_chance = math.sqrt(chance * (1 - chance) / n)
        se_gap = math.sqrt((agree * (1 - agree) + control * (1 - control)) / n)
        assert agree > chance + 10 * se_chance, (agree, chance)  # far above chance
        assert agree > control + 10 * se_gap, (agree, control)   # and far above the control


def test_posttrain_epochs_do_no_backbone_backward(plain_run, train_config):
    cfg = train_config(QUICK + ["trainer.max_epochs=1", "mode=posttrain",
                                f"backbone.checkpoint={plain_run}"])
    _, objects = train(cfg)
    net = objects["net"]
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.exits.parameters())
    module = objects["module"]
    module.train()
    assert module.net.exits.training and not module.net.backbone.training


def test_posttrain_needs_a_trained_backbone(train_config):
    with pytest.raises(EENetError, match="mode=posttrain starts from a trained backbone"):
        train(train_config(QUICK + ["mode=posttrain"]))
    with pytest.raises(EENetError, match="unknown mode 'frozen'"):
        train(train_config(QUICK + ["mode=frozen"]))


def test_backbone_checkpoint_errors(plain_run, tmp_path):
    from eenet.models import create_backbone

    b = create_backbone("resnet32", num_classes=10, in_chans=1)
    with pytest.raises(EENetError, match="does not match the configured model"):
        load_backbone_weights(b, plain_run)
    with pytest.raises(EENetError, match="not found"):
        load_backbone_weights(b, tmp_path / "none.pt")
    b20 = create_backbone("resnet20", num_classes=10, in_chans=1)
    h = state_hash(b20)
    load_backbone_weights(b20, plain_run / "model.pt")
    assert state_hash(b20) != h
    torch.save(b20.state_dict(), tmp_path / "plain_state.pt")  # a plain backbone state_dict
    b2 = create_backbone("resnet20", num_classes=10, in_chans=1)
    load_backbone_weights(b2, tmp_path / "plain_state.pt")
    assert state_hash(b2) == state_hash(b20)
