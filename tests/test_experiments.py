"""The experiment scripts: each one starts; each PTEENet study config composes the settings
its committed results were measured with; the PTEENet script runs end to end on digits."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
SCRIPTS = sorted(p for p in EXPERIMENTS.rglob("*.py")
                 if "runs" not in p.relative_to(EXPERIMENTS).parts)
PTEENET = EXPERIMENTS / "pteenet" / "run.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"experiment_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pteenet = _load(PTEENET)


def _run_main(script: Path, args: list[str], monkeypatch) -> int:
    """Run ``script`` as ``__main__`` in this process; its exit code (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_the_layout_has_the_scripts_the_readme_names():
    names = {str(p.relative_to(EXPERIMENTS)) for p in SCRIPTS}
    assert {"pteenet/run.py", "mnist_budget/run.py", "kill_resume/run.py", "mnist_core/run.py",
            "bench/bench_inference.py", "tables.py"} <= names
    # no result file is left at the top of experiments/
    assert not list(EXPERIMENTS.glob("*.json"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_script_starts(script, monkeypatch, capsys):
    """Its imports work after the re-layout and it parses its command line (``--help``)."""
    assert _run_main(script, ["--help"], monkeypatch) == 0
    assert "usage:" in capsys.readouterr().out


# --- the PTEENet studies ---------------------------------------------------------------

# what experiments/pteenet_cifar10.py (argparse, before the study configs) passed for --loss
OLD_LOSSES = {"two_stage": (["loss=two_stage", "loss.first_epochs=1"], "loss.second.lambda_coef"),
              "multi_ce": (["loss=multi_ce"], None),
              "eenet_v2_ce": (["loss=eenet_v2_ce"], "loss.terms.eenet.lambda_coef"),
              "eenet_v2_kd": (["loss=eenet_v2_kd"], "loss.terms.eenet.lambda_coef")}
RUN_ONLY = ["trainer.enable_progress_bar=false", "logger=csv"]


def _old_overrides(s: dict) -> tuple[list[str], list[str]]:
    """The branch run (first lambda) and backbone run overrides that the argparse script
    built from its recorded ``settings`` (its defaults where a setting is absent)."""
    loss, lam_key = OLD_LOSSES[s.get("loss", "two_stage")]
    stages = s.get("exit_stages")
    base = ["dataset=cifar10_jpeg", "backbone=resnet20", *RUN_ONLY]
    branches = [*base, f"seed={s['seed']}", "exit=pteenet", f"exit.convs={s['branch_convs']}",
                f"exit.width={s['branch_width'] or 'null'}",
                f"exit.stride={s.get('branch_stride', 1)}",
                f"exit.width_growth={s.get('branch_growth', 1.0)}",
                f"targets={s.get('targets', 'labels')}",
                *(["placement.method=explicit", f"placement.stages=[{','.join(map(str, stages))}]"]
                  if stages else
                  ["placement.method=linear", f"placement.num_exits={s.get('num_exits', 3)}"]),
                *loss, "mode=posttrain", f"trainer.max_epochs={s['post_epochs']}"]
    if lam_key:
        branches.append(f"{lam_key}={s['lambdas'][0]}")
    backbone = [*base, "seed=0", "placement.method=explicit", "placement.stages=[]",
                "loss=multi_ce", f"optimizer={s.get('backbone_optimizer', 'adam')}",
                f"trainer.max_epochs={s['backbone_epochs']}"]
    return branches, backbone


def _what_it_computes(cfg) -> dict:
    """A composed train config without the keys that do not change what a run computes."""
    from omegaconf import OmegaConf

    c = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    c = json.loads(json.dumps(c))
    for key in ("study", "output_dir", "data_root", "threads", "logger"):
        c.pop(key, None)
    c["dataset"]["datamodule"].pop("root")
    c["trainer"].pop("enable_progress_bar")
    c["backbone"].pop("checkpoint", None)
    if c["placement"]["method"] == "explicit":
        c["placement"].pop("num_exits")  # not read by an explicit placement
    return c


def _compose(overrides):
    from eenet.config import compose_config

    return compose_config(overrides, output_dir="unset")


@pytest.mark.parametrize("study", pteenet.study_names())
def test_each_study_config_composes_what_its_results_were_measured_with(study):
    """``results/<study>.json`` was measured by the argparse script, whose arguments it
    records (``settings``): the study config composes the same branch and backbone runs."""
    saved = json.loads((EXPERIMENTS / "pteenet" / "results" / f"{study}.json").read_text())
    cfg, branch_overrides, backbone_overrides = pteenet.study_config(study)
    lam_key = pteenet.lambda_key(cfg.loss)
    first_lambda = [] if lam_key is None else [f"{lam_key}={cfg.study.lambdas[0]}"]
    new_branches = _compose(pteenet.merge_overrides(branch_overrides, first_lambda))
    new_backbone = _compose(backbone_overrides)
    if "config" in saved:  # measured by the study script itself
        assert saved["study"] == study and saved["overrides"] == []
        assert _what_it_computes(saved["config"]) == _what_it_computes(cfg)
        return
    s = saved["settings"]
    old_branches, old_backbone = _old_overrides(s)
    assert _what_it_computes(new_branches) == _what_it_computes(_compose(old_branches))
    assert _what_it_computes(new_backbone) == _what_it_computes(_compose(old_backbone))
    assert list(cfg.study.lambdas) == s["lambdas"]
    assert list(cfg.study.policies) == s.get("policies", ["confidence"])
    assert cfg.study.tolerance == s["tolerance"]
    assert cfg.study.optimism_folds == s.get("optimism_folds", 0)
    if cfg.study.optimism_folds:
        assert cfg.study.optimism_repeats == s["optimism_repeats"]


def test_lambda_key_finds_the_one_lambda_of_each_loss():
    keys = {loss: pteenet.lambda_key(_compose([f"loss={loss}"]).loss) for loss in OLD_LOSSES}
    assert keys == {loss: key for loss, (_, key) in OLD_LOSSES.items()}


def test_later_overrides_replace_earlier_ones_of_the_same_key():
    merged = pteenet.merge_overrides(["dataset=cifar10_jpeg", "seed=0"],
                                     ["+seed=1", "dataset=digits"])
    assert merged == ["+seed=1", "dataset=digits"]


@pytest.mark.parametrize("args, message", [
    (["--study", "nope"], "error: unknown study 'nope'; accepted: "),
    (["loss=nope"], "error: unknown loss 'nope'; accepted: "),
    (["study.lambdas=[1"], "error: "),
    (["--smoke", "extra"], "error: 'extra' is not an override"),
])
def test_pteenet_bad_input_is_one_line(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert _run_main(PTEENET, [*args, "--runs", str(tmp_path)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def _smoke(runs: Path, *args: str) -> str:
    """``experiments/pteenet/run.py --smoke`` (digits, one epoch a run) into ``runs``; stdout."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(PTEENET), "--smoke", "--runs", str(runs), *args,
                           "threads=1"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> Path:
    """The task's example command, on digits: the default study (every_stage_kd_cv) with
    one lambda given on the command line and a second seed of the branches."""
    runs = tmp_path_factory.mktemp("pteenet_runs")
    _smoke(runs, "loss.terms.eenet.lambda_coef=2", "seed=1", "--name", "kd_lambda2_seed1")
    return runs


@pytest.mark.slow  # 27 s set-up; make test keeps the PTEENet table's SMOKE run
def test_pteenet_smoke_runs_the_study_pipeline(smoke_runs):
    saved = json.loads((smoke_runs / "kd_lambda2_seed1.json").read_text())
    assert saved["study"] == "every_stage_kd_cv" and saved["smoke"] is True
    assert saved["overrides"] == ["loss.terms.eenet.lambda_coef=2", "seed=1", "threads=1"]
    # the same branch runs as the seed-1 study at lambda 2 (on digits, one epoch)
    seed1, _, _ = pteenet.study_config(
        "every_stage_kd_cv_seed1", ["threads=1", "loss.terms.eenet.lambda_coef=2"], smoke=True)
    assert _what_it_computes(saved["config"]) == _what_it_computes(seed1)
    assert saved["settings"]["optimism_folds"] == 5
    assert saved["lambda_key"] == "loss.terms.eenet.lambda_coef"
    [entry] = saved["sweep"]  # the command line's lambda replaced the sweep
    assert entry["lambda"] == 2.0 and entry["hash_unchanged"]
    assert entry["backbone_hash_before"] == entry["backbone_hash_after"]
    assert set(entry["val_cost_by_policy"]) == {"max_prob", "entropy"}
    assert entry["policy"] == min(entry["val_cost_by_policy"], key=entry["val_cost_by_policy"].get)
    assert entry["optimism"] is not None  # the tolerance was corrected (5-fold x 4)
    assert entry["exit_stages"][:-1] == list(range(8))
    assert 0 <= entry["test_accuracy"] <= 1 and saved["posttrain_speedup"] > 0
    run_cfg = yaml.safe_load((Path(entry["run_dir"]) / "config.yaml").read_text())
    assert run_cfg["mode"] == "posttrain" and run_cfg["seed"] == 1
    assert run_cfg["loss"]["terms"]["eenet"]["lambda_coef"] == 2.0
    assert run_cfg["backbone"]["checkpoint"] == saved["backbone"]["run_dir"]
    backbone_cfg = yaml.safe_load((Path(saved["backbone"]["run_dir"]) / "config.yaml").read_text())
    assert backbone_cfg["placement"]["stages"] == [] and backbone_cfg["seed"] == 0


@pytest.mark.slow  # shares the 27 s set-up above
def test_pteenet_second_study_reuses_the_backbone(smoke_runs):
    """A study with the same backbone recipe (SGD) trains no backbone of its own."""
    backbone = json.loads((smoke_runs / "kd_lambda2_seed1.json").read_text())["backbone"]["run_dir"]
    out = _smoke(smoke_runs, "--study", "downsampling_multice")
    assert f"reusing {backbone}" in out
    other = json.loads((smoke_runs / "downsampling_multice.json").read_text())
    assert other["backbone"]["run_dir"] == backbone
    [entry] = other["sweep"]  # multi_ce has no lambda: one run
    assert entry["lambda"] is None and other["lambda_key"] is None and entry["hash_unchanged"]
    assert len(entry["exit_stages"]) == 7  # six branches and the final exit
