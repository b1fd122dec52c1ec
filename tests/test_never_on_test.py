"""Thresholds never see the test split: change every test label (and the test images) and
the thresholds eenet-eval chooses do not move, while its test figures do.

The real evaluation job (``eenet.jobs.evaluate.evaluate``) runs on one digits run,
trained once for this module; only the test split it loads is changed, by wrapping
the ``load_run`` it calls. Everything the calibration writes (the chosen point, its
thresholds, the val curve, the Pareto front, the target) must be identical to the
byte; the test figures must differ, which shows the change reached the job.
"""

from __future__ import annotations

import pytest
import torch

import eenet.jobs.evaluate as evaluate_job
from eenet.config import compose_config
from eenet.jobs.train import train
from eenet.runs import load_run

#: calibration entries computed from the test split (reported, never used to choose)
FROM_TEST = {"test_curve", "final_exit_test"}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("never_on_test_run")
    cfg = compose_config(["trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                          "logger=none", "anytime=false", "checkpoint.enabled=false",
                          "placement.num_exits=3"], output_dir=out)
    train(cfg)
    return out


def changed_test_split(labels: bool, images: bool):
    """A ``load_run`` whose test split has every label moved to another class and/or its
    images replaced by noise of the same shape, dtype and range."""

    def load(run_dir, data_root=None):
        cfg, dm, net, cost = load_run(run_dir, data_root)
        test = dm.test_dataset
        g = torch.Generator().manual_seed(1)
        if labels:  # + 1..K-1 (mod K): no label stays what it was
            shift = torch.randint(1, net.num_classes, test.labels.shape, generator=g)
            test.labels = (test.labels + shift) % net.num_classes
        if images:
            lo, hi = float(test.images.min()), float(test.images.max())
            test.images = (lo + (hi - lo) * torch.rand(test.images.shape, generator=g)
                           ).to(test.images.dtype)
        return cfg, dm, net, cost

    return load


def run_eval(run, out, *overrides):
    cfg = compose_config([f"run={run}", "timing_passes=0", *overrides], output_dir=out,
                         config_name="eval")
    return evaluate_job.evaluate(cfg)


def chosen_on_val(results: dict) -> dict:
    cal = {k: v for k, v in results["calibration"].items() if k not in FROM_TEST}
    return {"calibration": cal, "val": results["val"], "target": results["target"],
            "thresholds": results["policy"]["thresholds"]}


# two of the four run by make test-slow: the calibration code they reach is the same
@pytest.mark.parametrize("policy,target", [
    ("confidence", "tolerance=1.0"), ("max_prob", "budget=0.5"),
    pytest.param("entropy", "min_accuracy=0.5", marks=pytest.mark.slow),
    pytest.param("patience", "tolerance=2.0", marks=pytest.mark.slow)])
def test_changing_the_test_split_does_not_move_the_thresholds(digits_run, tmp_path, monkeypatch,
                                                              policy, target):
    before = run_eval(digits_run, tmp_path / "before", f"policy={policy}", target)
    acc = before["test"]["accuracy"]
    assert acc > 0.5  # so that moving every label must change it (below)
    for labels, images in ((True, False), (True, True)):
        monkeypatch.setattr(evaluate_job, "load_run", changed_test_split(labels, images))
        after = run_eval(digits_run, tmp_path / f"after_{int(labels)}{int(images)}",
                         f"policy={policy}", target)
        assert chosen_on_val(after) == chosen_on_val(before)
        # the change reached the job: the test figures differ
        assert after["test"] != before["test"]
        if not images:  # same predictions, every label moved: only the samples wrong
            # before can be right now, so the accuracy is at most 1 - acc < acc
            assert after["test"]["accuracy"] <= 1 - acc + 1e-12
    monkeypatch.undo()
    # the data on disk and a fresh load are untouched
    again = run_eval(digits_run, tmp_path / "again", f"policy={policy}", target)
    assert again["test"] == before["test"] and chosen_on_val(again) == chosen_on_val(before)
