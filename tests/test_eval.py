"""eenet-eval: calibration on val, dynamic engine on test, the report files, safe loading."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eenet.errors import EENetError
from eenet.jobs.evaluate import evaluate
from eenet.runs import load_run
from eenet.config import compose_config
from eenet.jobs.train import train


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    cfg = compose_config(["trainer.max_epochs=4", "trainer.enable_progress_bar=false",
                          "logger=none"], output_dir=out)
    train(cfg)
    return out


def eval_config(run, out, *overrides):
    return compose_config([f"run={run}", *overrides], output_dir=out, config_name="eval")


def test_eval_with_tolerance_writes_the_report(digits_run, tmp_path):
    out = tmp_path / "eval"
    res = evaluate(eval_config(digits_run, out, "tolerance=1.0", "batch_size=64"))
    for name in ("results.json", "results.md", "curve.png", "exits.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["target"]["kind"] == "tolerance" and saved["target"]["value"] == 1.0
    cal = saved["calibration"]
    assert cal["reachable"] is True
    assert cal["chosen"]["accuracy"] >= cal["reference_final_exit"]["accuracy"] - 0.01 - 1e-12
    assert len(saved["policy"]["thresholds"]) == 2
    assert len(cal["curve"]) > 2 and len(cal["pareto"]) >= 1 and len(cal["test_curve"]) == len(cal["curve"])
    # test figures come from the dynamic engine, which agrees with static path + policy
    assert saved["engine"]["agreement_with_static"] == 1.0
    t = saved["test"]
    assert t["n"] == 360 and sum(t["exit_rates"]) == pytest.approx(1.0)
    fr = [e["cost_fraction"] for e in saved["exits"]]
    assert t["avg_cost_fraction"] == pytest.approx(sum(r * c for r, c in zip(t["exit_rates"], fr)))
    assert res["test"]["accuracy"] == t["accuracy"]
    # the drop against the final exit, with its paired standard error, on both splits
    drops = saved["drop_vs_final_exit"]
    assert drops["val"]["drop_points"] == pytest.approx(
        100 * (cal["reference_final_exit"]["accuracy"] - cal["chosen"]["accuracy"]))
    assert drops["test"]["drop_points"] == pytest.approx(
        100 * (cal["final_exit_test"]["accuracy"] - t["accuracy"]))
    assert all(d["se_points"] >= 0 and 0 <= d["discordant"] <= 1 for d in drops.values())
    # the training run's own files are untouched
    assert json.loads((digits_run / "results.json").read_text())["dataset"] == "digits"


def test_eval_with_budget_and_latency(digits_run, tmp_path):
    res = evaluate(eval_config(digits_run, tmp_path / "b", "budget=0.3", "policy=max_prob",
                               "latency=true"))
    assert res["calibration"]["chosen"]["avg_cost"] <= 0.3
    assert {r["batch_size"] for r in res["latency"]} == {1, 256}
    assert (tmp_path / "b" / "latency.json").is_file()


def test_unreachable_budget_is_reported(digits_run, tmp_path):
    res = evaluate(eval_config(digits_run, tmp_path / "u", "budget=0.05"))
    assert res["calibration"]["reachable"] is False
    assert "unreachable" in res["calibration"]["message"]


def test_eval_needs_exactly_one_target_and_a_run(digits_run, tmp_path):
    with pytest.raises(EENetError, match="exactly one calibration target"):
        evaluate(eval_config(digits_run, tmp_path / "x"))
    with pytest.raises(EENetError, match="not a finished eenet-train run"):
        evaluate(eval_config(tmp_path, tmp_path / "y", "tolerance=1"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(digits_run, tmp_path):
    run = tmp_path / "evil_run"
    run.mkdir()
    (run / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    marker = tmp_path / "payload_ran"
    with open(run / "model.pt", "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    with pytest.raises(EENetError, match="cannot load .* safely"):
        load_run(run)
    assert not marker.exists()
    # the same file with plain unpickling would have run the payload: the test is real
    with open(run / "model.pt", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_truncated_or_mismatching_weights_are_named(digits_run, tmp_path):
    run = tmp_path / "bad_run"
    run.mkdir()
    (run / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    data = (digits_run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EENetError, match="cannot load"):
        load_run(run)
    state = torch.load(digits_run / "model.pt", weights_only=True)
    state.pop("exits.1.confidence.bias")
    torch.save(state, run / "model.pt")
    with pytest.raises(EENetError, match="missing: exits.1.confidence.bias"):
        load_run(run)


def test_eval_cli(digits_run, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "eenet.cli.eval", f"run={digits_run}", "tolerance=2",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Calibrated on val for tolerance 2.0 points" in proc.stdout
    assert (out / "curve.png").is_file()


def test_eval_with_optimism_correction_records_it(digits_run, tmp_path):
    out = tmp_path / "eval_cv"
    evaluate(eval_config(digits_run, out, "tolerance=1.0", "optimism_folds=3",
                            "optimism_repeats=2"))
    saved = json.loads((out / "results.json").read_text())
    target = saved["calibration"]["target"]
    opt = target["optimism"]
    assert target["value"] == 1.0 and opt["folds"] == 3 and opt["repeats"] == 2
    assert len(opt["per_fold_points"]) == 6
    assert 0 <= opt["effective_tolerance"] <= 1.0
    assert target["min_accuracy"] == pytest.approx(
        target["final_exit_accuracy"] - opt["effective_tolerance"] / 100)
    assert "tightened" in saved["calibration"]["message"] or not saved["calibration"]["reachable"]
