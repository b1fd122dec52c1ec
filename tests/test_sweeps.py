"""Hydra sweeps through eenet-train: joblib (parallel local), submitit (local executor), Optuna."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

FAST = ["debug=fdr", "logger=none", "trainer.enable_progress_bar=false", "threads=1"]


def _sweep(args, sweep_dir, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "eenet.cli.train", "-m", *FAST, *args,
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=sweep_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _seeds(sweep_dir, n):
    return sorted(json.loads((sweep_dir / str(i) / "results.json").read_text())["config"]["seed"]
                  for i in range(n))


@pytest.mark.slow  # 13 s; the basic launcher's sweeps run in make test
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    sweep = tmp_path / "joblib"
    _sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2"], sweep)
    assert _seeds(sweep, 2) == [1, 2]


@pytest.mark.slow  # 16 s; the basic launcher's sweeps run in make test
def test_submitit_launcher_with_the_local_executor(tmp_path):
    sweep = tmp_path / "submitit"
    _sweep(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
            "hydra.launcher.cpus_per_task=1", "seed=3,4"], sweep)
    assert _seeds(sweep, 2) == [3, 4]
    # submitit kept its job logs: the jobs really went through its executor
    assert any(p.suffix == ".out" for p in sweep.rglob("*"))


@pytest.mark.slow  # 18 s; the basic launcher's sweeps run in make test
def test_optuna_searches_lambda_and_exit_width_against_a_budget(tmp_path):
    sweep = tmp_path / "optuna"
    _sweep(["loss=two_stage", "hparams_search=optuna_budget", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2"], sweep)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"loss.second.lambda_coef", "exit.convs", "exit.width"}
    trials = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
    # every trial's value is its validation objective (never a test figure)
    assert all(t["objective"]["budget"] == 0.3 for t in trials)
    assert best["best_value"] == max(t["objective"]["val_accuracy"] for t in trials)
