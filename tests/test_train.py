"""The training entry point: train(cfg) on the bundled digits, the CLI, sweeps and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import eenet
from eenet.errors import EENetError
from eenet.jobs.train import train
from eenet.reporting.results import PLAIN_FORMAT, RunResults, SplitResult
from eenet.runs import build_network

QUICK = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=csv"]
REPO = Path(__file__).resolve().parents[1]
#: the top-level keys eenet-train wrote before typed results (commit 0b1432b): all stay
PREVIOUS_TRAIN_KEYS = {
    "dataset", "backbone", "num_classes", "backbone_macs", "macs_convention", "input_size",
    "exits", "policy", "test", "val", "splits", "epochs", "best_checkpoint", "val_loss",
    "test_loss", "resumed_from", "world_size", "mode", "targets", "backbone_hash_before",
    "backbone_hash_after", "train_epoch_seconds", "config", "anytime", "wall_s"}


def test_train_on_digits_writes_the_documented_results(train_config, tmp_path):
    cfg = train_config(QUICK + ["placement.num_exits=2"])
    results, objects = train(cfg)
    out = Path(cfg.output_dir)
    for name in ("results.json", "results.md", "model.pt", "config.yaml", "cost.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert set(saved) == PREVIOUS_TRAIN_KEYS | {"format_version", "eenet_version",
                                                "training_segments"}
    # one process trained it, on this machine: its epochs, and all of the run's wall time
    [seg] = saved["training_segments"]
    assert seg["epochs"] == [0, 1] and seg["device"] == "cpu"
    assert seg["cpu_count"] == os.cpu_count() and seg["torch_threads"] == torch.get_num_threads()
    assert "hostname" not in seg
    assert seg["wall_s"] == saved["wall_s"]
    assert len(saved["train_epoch_seconds"]) == 2
    # no temperatures in a training run's results: format 2's layout and number
    assert saved["format_version"] == PLAIN_FORMAT and saved["eenet_version"] == eenet.__version__
    assert set(saved["test"]) == {"accuracy", "avg_cost_fraction", "exit_rates", "n",
                                  "mixture_acc", "expected_cost", "oracle_acc"}
    assert set(saved["val"]) == {"accuracy", "avg_cost_fraction", "exit_rates", "n"}
    assert RunResults.from_dict(saved).to_dict() == saved
    # one vocabulary: the module's last metrics are the SplitResults written to the file
    for split in ("val", "test"):
        metrics = objects["module"].last_metrics[split]
        assert isinstance(metrics, SplitResult)
        assert metrics.accuracy == saved[split]["accuracy"]
        assert metrics.avg_cost_fraction == saved[split]["avg_cost_fraction"]
        assert metrics.loss == saved[f"{split}_loss"]
        assert metrics.exit_accuracy == [e[f"{split}_accuracy"] for e in saved["exits"]]
    assert saved["dataset"] == "digits" and saved["backbone"] == "resnet20"
    assert len(saved["exits"]) == 3
    for e in saved["exits"]:
        assert set(e) == {"name", "stage", "macs", "head_macs", "cost_fraction", "val_accuracy",
                          "test_accuracy", "test_overthinking"}
        assert 0 <= e["test_accuracy"] <= 1
    assert saved["exits"][-1]["cost_fraction"] > 1  # exit heads are paid for
    t = saved["test"]
    assert t["n"] == 360 and abs(sum(t["exit_rates"]) - 1) < 1e-9
    fr = [e["cost_fraction"] for e in saved["exits"]]
    assert t["avg_cost_fraction"] == pytest.approx(sum(r * c for r, c in zip(t["exit_rates"], fr)))
    assert saved["policy"] == {"name": "confidence", "thresholds": 0.5}
    # the weights are a plain state_dict that loads safely into a freshly built network
    state = torch.load(out / "model.pt", weights_only=True)
    net = build_network(cfg, (1, 8, 8))
    net.load_state_dict(state)
    # the saved config rebuilds the same run
    again = yaml.safe_load((out / "config.yaml").read_text())
    assert again["placement"] == {"method": "fine", "num_exits": 2, "stages": None}
    # per-exit metrics under stable keys in the CSV log
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("val/exit0/acc", "val/exit2/acc", "val/exit0/rate", "val/acc", "val/avg_cost",
                "val/mixture_acc", "val/expected_cost", "val/loss", "train/loss"):
        assert key in header, key
    assert "| exit0 |" in (out / "results.md").read_text()
    assert objects["trainer"].current_epoch == 2


def test_plain_backbone_is_the_same_recipe_without_exits(train_config):
    cfg = train_config(QUICK + ["placement.method=explicit", "placement.stages=[]", "logger=none"])
    results, objects = train(cfg)
    assert len(results["exits"]) == 1
    assert results["exits"][0]["cost_fraction"] == pytest.approx(1.0)
    assert results["test"]["exit_rates"] == [1.0]


def test_training_learns_digits(train_config):
    """Ten epochs on digits must beat chance by far at every exit (a check that can fail)."""
    cfg = train_config(["trainer.max_epochs=10", "trainer.enable_progress_bar=false",
                        "logger=none", "loss=multi_ce"])
    results, _ = train(cfg)
    accs = [e["test_accuracy"] for e in results["exits"]]
    assert min(accs) > 0.8, accs


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


BAD = [
    (["backbone.name=resnet21"], "unknown backbone 'resnet21'; accepted:"),
    (["loss.second.lambda_coef=-1"], "lambda_coef must be >= 0"),
    (["policy.thresholds=1.5"], "confidence threshold 1.5 is outside (0, 1)"),
    (["placement.num_exits=9"], "9 exits do not fit"),
    (["placement.method=explicit", "placement.stages=[12]"], "exit stage 12 is out of range"),
    (["placement.method=uniform"], "unknown exit placement 'uniform'"),
    (["exit.preblock=maxpool"], "unknown exit preblock 'maxpool'"),
    (["dataset=mnist", "data_root=/nonexistent/eenet-data"], "train-images-idx3-ubyte"),
    (["dataset.datamodule.name=mnist2"], "unknown dataset 'mnist2'"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_configuration_is_one_line_and_writes_nothing(train_config, tmp_path, overrides,
                                                          message):
    out = tmp_path / "earlier_run"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    (out / "model.pt").write_bytes(b"weights of an earlier run")
    before = _snapshot(out)
    cfg = train_config(QUICK + overrides, output_dir=out)
    with pytest.raises(EENetError) as err:
        train(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert _snapshot(out) == before


def _cli(args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled", "EENET_DATA_ROOT": str(REPO.parent / "shared" / "data")}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "eenet.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_bad_input_prints_one_line_and_exits_nonzero(tmp_path):
    run = tmp_path / "run"
    proc = _cli(["backbone.name=resnet21", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: unknown backbone 'resnet21'; accepted: ")
    assert {"resnet20", "resnet18", "resnet8_tiny"} <= set(errors[0].split(": ")[-1].split(", "))
    assert "Traceback" not in proc.stderr
    assert not any(run.rglob("*.json")) if run.exists() else True
    full = _cli(["backbone.name=resnet21", f"hydra.run.dir={run}"], tmp_path,
                {"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_cli_multirun_sweep_makes_one_folder_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli(["-m", "loss.second.lambda_coef=0.5,2", "debug=fdr", "logger=none",
                 "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lambdas = []
    for job in ("0", "1"):
        res = json.loads((sweep / job / "results.json").read_text())
        lambdas.append(res["config"]["loss"]["second"]["lambda_coef"])
    assert lambdas == [0.5, 2.0]


#: configs whose one-batch run takes over 5 s on a 2-core CPU: run by make test-slow (the other
#: PTEENet configs run the same code in make test)
SLOW_EXPERIMENTS = {"pteenet_densenet40_cifar10", "pteenet_vgg16_cifar10"}


@pytest.mark.parametrize("experiment", [
    pytest.param(e, marks=pytest.mark.slow) if e in SLOW_EXPERIMENTS else e
    for e in sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))])
def test_every_experiment_config_runs(train_config, experiment, tmp_path, data_root):
    """Smoke-run each experiment config with fast_dev_run on tiny subsets of its data set: the
    real one where ../shared/data has it, else small files in its own layout (conftest's data_root)."""
    base = [f"experiment={experiment}", "debug=fdr", "logger=none", f"data_root={data_root.path}",
            "trainer.enable_progress_bar=false"]
    cfg = train_config(base)
    if cfg.dataset.name != "digits":
        root = Path(cfg.dataset.datamodule.root)
        assert root.exists(), f"the data root has no {cfg.dataset.name} at {root}"
        cfg = train_config([*base, "dataset.datamodule.train_subset=600",
                            "dataset.datamodule.val_size=100", "dataset.datamodule.test_subset=100"])
    if cfg.get("mode") in ("posttrain", "mixed") and not cfg.backbone.get("checkpoint"):
        # post-training starts from a trained backbone: give it one (random weights suffice here)
        from omegaconf import open_dict

        from eenet.runs import build_network

        ckpt = tmp_path / "backbone.pt"
        net = build_network(cfg, tuple([cfg.dataset.in_chans, *cfg.dataset.image_size]), stages=[])
        torch.save(net.backbone.state_dict(), ckpt)
        with open_dict(cfg):
            cfg.backbone.checkpoint = str(ckpt)
    results, _ = train(cfg)
    assert results["test"]["n"] > 0
    if cfg.get("mode") == "posttrain":
        assert results["backbone_hash_before"] == results["backbone_hash_after"]


def test_wandb_offline_run_without_key_or_mode(train_config, tmp_path, monkeypatch):
    """No key, no WANDB_MODE: the run goes offline, never hangs, and leaves its files."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    cfg = train_config(["trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                        "logger=wandb", "dataset.datamodule.train_subset=400"])
    train(cfg)  # closes its run: the files must be complete when it returns
    runs = list((Path(cfg.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name: p for p in runs[0].rglob("*") if p.is_file()}
    logs = [p for name, p in files.items() if name.endswith(".wandb")]
    assert len(logs) == 1, sorted(files)
    # an offline run keeps its config inside the .wandb log until `wandb sync`
    log = logs[0].read_bytes()
    assert b"lambda_coef" in log and b"placement" in log
    tables = [name for name in files if name.startswith("exits_") and name.endswith(".table.json")]
    assert len(tables) == 1, sorted(files)
    table = json.loads(files[tables[0]].read_text())
    assert table["columns"][:2] == ["exit", "stage"] and len(table["data"]) == 3
    # the accuracy-versus-cost curve and the exit histogram, as W&B plots with their tables
    curve = [n for n in files if n.startswith("accuracy_vs_cost") and n.endswith(".table.json")]
    hist = [n for n in files if n.startswith("exit_histogram") and n.endswith(".table.json")]
    assert curve and hist, sorted(files)
    assert json.loads(files[curve[0]].read_text())["columns"] == ["avg_cost_fraction", "test_accuracy"]
    assert len(json.loads(files[hist[0]].read_text())["data"]) == 3
    # per-exit metrics over training and the configuration
    for key in (b"val/exit0/acc", b"val/exit1/rate", b"val/exit0/overthinking", b"trainer"):
        assert key in log, key
    # a second job in the same process (a sweep) gets its own run, not the first one's
    cfg2 = train_config(["trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                         "logger=wandb", "dataset.datamodule.train_subset=400"],
                        output_dir=tmp_path / "run2")
    train(cfg2)
    runs2 = list((Path(cfg2.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs2) == 1 and runs2[0].name != runs[0].name
    logs2 = list(runs2[0].rglob("*.wandb"))
    assert len(logs2) == 1 and b"val/exit0/acc" in logs2[0].read_bytes()
