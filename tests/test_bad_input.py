"""Bad configurations and inputs, as a table: one clear line, exit code 2, earlier outputs untouched.

Every row goes through the real entry points (``run_job(train, cfg)`` /
``run_job(evaluate, cfg)``, what ``eenet-train`` and ``eenet-eval`` call after
Hydra composed the config), a few through the command line itself.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eenet.errors import EENetError
from eenet.jobs.evaluate import evaluate
from eenet.jobs.export import export_run
from eenet.cli.common import run_job
from eenet.config import check_command_line, compose_config, config_dir
from eenet.config_checks import check_eval_config, check_export_config, check_train_config
from eenet.jobs.train import train
from folder_state import snapshot  # tests/ is on sys.path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
         f"data_root={SHARED}"]

TRAIN_ROWS = [
    ("backbone channels not the data's", ["dataset.in_chans=3"],
     "the input has 1 channel(s) but the backbone expects 3"),
    ("unknown backbone name", ["backbone.name=resnet21"], "unknown backbone 'resnet21'; accepted:"),
    ("unknown dataset name", ["dataset.datamodule.name=mnist2"], "unknown dataset 'mnist2'; accepted:"),
    ("unknown exit pre-block", ["exit.preblock=maxpool"], "unknown exit preblock 'maxpool'; accepted:"),
    ("unknown confidence input", ["exit.confidence_input=mlp"], "unknown exit confidence_input 'mlp'"),
    ("unknown placement", ["placement.method=uniform"], "unknown exit placement 'uniform'; accepted:"),
    ("too many exits", ["placement.num_exits=9"], "9 exits do not fit with placement 'fine'"),
    ("exit stage out of range", ["placement.method=explicit", "placement.stages=[12]"],
     "exit stage 12 is out of range"),
    ("exit stages not increasing", ["placement.method=explicit", "placement.stages=[3,1]"],
     "strictly increasing"),
    ("negative lambda", ["loss.second.lambda_coef=-1"], "lambda_coef must be >= 0"),
    ("negative lambda, eenet_v2", ["loss=eenet_v2", "loss.lambda_coef=-1"], "lambda_coef must be >= 0"),
    ("unknown EENet loss version", ["loss=eenet_v2", "loss.version=3"], "version must be 1 or 2"),
    ("threshold above 1", ["policy.thresholds=1.5"], "confidence threshold 1.5 is outside (0, 1)"),
    ("threshold of 0", ["policy.thresholds=0.0"], "confidence threshold 0.0 is outside (0, 1)"),
    ("wrong number of thresholds", ["policy.thresholds=[0.5,0.5,0.5]"],
     "3 thresholds given for 2 early exits"),
    ("unknown policy", ["policy.name=softmax"], "unknown exit policy 'softmax'; accepted:"),
    ("data root without the files", ["dataset=mnist", "data_root=/nonexistent/eenet"],
     "train-images-idx3-ubyte"),
    ("validation fraction out of range", ["dataset.datamodule.val_size=1.5"],
     "dataset.datamodule.val_size=1.5 must be a fraction in (0, 1) or a sample count >= 1"),
    ("batch size 0", ["dataset.datamodule.batch_size=0"], "batch_size must be an integer >= 1"),
    ("mean/std for the wrong channel count", ["dataset.datamodule.mean=[0.1,0.2]",
                                              "dataset.datamodule.std=[0.3,0.3]"],
     "has 1 channel(s) but mean/std have 2 values"),
    ("unknown augmentation", ["dataset.datamodule.augment=[rotate]"], "unknown augmentation(s) rotate"),
    ("confidence learning-rate factor 0", ["confidence_lr_scale=0"],
     "confidence_lr_scale=0 must be a finite number > 0"),
    ("resume without a checkpoint", ["resume=true"], "resume=true but"),
    ("multi_ce weights of the wrong length", ["loss=multi_ce", "loss.weights=[1,1]"],
     "multi_ce has 2 weights for 3 exits"),
    # eenet.config_checks.check_train_config: each of these gave a traceback or a silently
    # wrong run before, several after config.yaml and cost.json had been written
    ("negative learning rate", ["optimizer.lr=-1"], "optimizer.lr=-1 must be a finite number > 0"),
    ("learning rate as a word", ["optimizer.lr=fast"], "optimizer.lr='fast' must be a finite number > 0"),
    ("infinite learning rate", ["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number > 0"),
    ("negative weight decay", ["optimizer.weight_decay=-0.1"],
     "optimizer.weight_decay=-0.1 must be a finite number >= 0"),
    ("momentum of 1.5", ["optimizer=sgd", "optimizer.momentum=1.5"],
     "optimizer.momentum=1.5 must be a number in [0, 1)"),
    ("nesterov as a word", ["optimizer=sgd", "optimizer.nesterov=yes"],
     "optimizer.nesterov='yes' must be true or false"),
    ("nesterov without momentum", ["optimizer=sgd", "optimizer.momentum=0"],
     "optimizer.nesterov=true needs optimizer.momentum > 0 and optimizer.dampening=0"),
    ("Adam beta of 1.5", ["+optimizer.betas=[0.9,1.5]"],
     "optimizer.betas=[0.9, 1.5] must be two values, each a number in [0, 1)"),
    ("Adam eps of 0", ["+optimizer.eps=0"], "optimizer.eps=0 must be a finite number > 0"),
    ("cosine period of 0", ["scheduler.T_max=0"], "scheduler.T_max=0 must be an integer >= 1"),
    ("scheduler stepped sometimes", ["+scheduler.interval=sometimes"],
     "unknown scheduler.interval 'sometimes'; accepted: epoch, step"),
    ("negative thread count", ["threads=-1"], "threads=-1 must be an integer >= 1 (or null: torch's default)"),
    ("thread count 0", ["threads=0"], "threads=0 must be an integer >= 1 (or null: torch's default)"),
    ("fractional thread count", ["threads=1.5"], "threads=1.5 must be an integer >= 1"),
    ("seed as a word", ["seed=random"], "seed='random' must be an integer in [0, 4294967295]"),
    ("negative seed", ["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    ("fractional seed", ["seed=1.5"], "seed=1.5 must be an integer in [0, 4294967295]"),
    ("zero epochs", ["trainer.max_epochs=0"], "trainer.max_epochs=0 must be an integer >= 1"),
    ("epochs as a word", ["trainer.max_epochs=ten"], "trainer.max_epochs='ten' must be an integer >= 1"),
    ("zero devices", ["trainer.devices=0"], "trainer.devices=0 must be an integer >= 1, 'auto' or a list"),
    ("unknown accelerator", ["trainer.accelerator=npu"], "unknown trainer.accelerator 'npu'; accepted: auto, gpu, cpu"),
    ("negative logging interval", ["trainer.log_every_n_steps=-1"],
     "trainer.log_every_n_steps=-1 must be an integer >= 1"),
    ("sanity steps below -1", ["trainer.num_sanity_val_steps=-5"],
     "trainer.num_sanity_val_steps=-5 must be an integer >= -1"),
    ("progress bar as a word", ["trainer.enable_progress_bar=no"],
     "trainer.enable_progress_bar='no' must be true or false"),
    ("deterministic as a word", ["trainer.deterministic=always"],
     "trainer.deterministic='always' must be true, false or 'warn'"),
    ("unknown precision", ["trainer.precision=half"], "unknown trainer.precision 'half'; accepted: auto, "),
    ("negative fast_dev_run", ["debug=fdr", "trainer.fast_dev_run=-1"],
     "trainer.fast_dev_run=-1 must be true, false or an integer >= 0"),
    ("overfit fraction above 1", ["debug=overfit", "trainer.overfit_batches=1.5"],
     "trainer.overfit_batches=1.5 must be an integer >= 0 (batches) or a float in [0, 1]"),
    ("checkpoint mode 'maximum'", ["checkpoint.mode=maximum"], "unknown checkpoint.mode 'maximum'; accepted: min, max"),
    ("checkpoint keeping the highest loss", ["checkpoint.mode=max"],
     "checkpoint.mode=max with checkpoint.monitor=val/loss keeps the worst checkpoint; give checkpoint.mode=min"),
    ("checkpoint keeping the lowest accuracy", ["checkpoint.monitor=val/acc"],
     "checkpoint.mode=min with checkpoint.monitor=val/acc keeps the worst checkpoint; give checkpoint.mode=max"),
    ("misspelt monitor", ["checkpoint.monitor=val/los"], "checkpoint.monitor='val/los' must be a key logged on "
                                                         "the validation split"),
    ("checkpoint chosen on test", ["checkpoint.monitor=test/acc"], "checkpoints are chosen on val, never on test"),
    ("checkpoint switch as a word", ["checkpoint.enabled=on"], "checkpoint.enabled='on' must be true or false"),
    ("unknown mode", ["mode=frozen"], "unknown mode 'frozen'; accepted: joint, posttrain, mixed"),
    ("post-training without a backbone", ["mode=posttrain"],
     "mode=posttrain starts from a trained backbone: give backbone.checkpoint="),
    ("unknown targets", ["targets=logits"], "unknown targets 'logits'; accepted: labels, backbone"),
    ("unknown mitigation", ["mitigation=trex"],
     "unknown mitigation 'trex'; accepted: trecx, concat, null (no mitigation)"),
    ("anytime as a word", ["anytime=yes"], "anytime='yes' must be true or false"),
    ("negative objective budget", ["objective_budget=-1"],
     "objective_budget=-1 must be an average cost fraction in (0, 1]"),
    ("objective budget in percent", ["objective_budget=30"],
     "objective_budget=30 must be an average cost fraction in (0, 1]"),
    ("resume as a word", ["resume=yes"], "resume='yes' must be true or false"),
    ("overwrite as a word", ["++overwrite=yes"], "overwrite='yes' must be true or false"),
    ("sync_batchnorm as a word", ["sync_batchnorm=off"], "sync_batchnorm='off' must be true or false"),
    ("confidence learning-rate factor as a word", ["confidence_lr_scale=high"],
     "confidence_lr_scale='high' must be a finite number > 0"),
    ("input channels 0", ["dataset.in_chans=0"], "dataset.in_chans=0 must be an integer >= 1"),
    ("no validation split", ["dataset.datamodule.val_size=0"],
     "dataset.datamodule.val_size=0 must be a fraction in (0, 1) or a sample count >= 1: checkpoints and "
     "thresholds are chosen on the validation split"),
    ("validation size as a word", ["dataset.datamodule.val_size=some"], "dataset.datamodule.val_size='some' must be"),
    ("validation split as large as the training subset",
     ["dataset.datamodule.train_subset=100", "dataset.datamodule.val_size=100"],
     "dataset.datamodule.val_size=100 must be below dataset.datamodule.train_subset=100"),
    ("drop_last as a word", ["dataset.datamodule.drop_last=yes"], "dataset.datamodule.drop_last='yes' must be true or"),
    ("download as a word", ["dataset.datamodule.download=no"], "dataset.datamodule.download='no' must be true or"),
    ("number of exits as a word", ["placement.num_exits=two"], "placement.num_exits='two' must be an integer"),
    ("fractional number of exits", ["placement.num_exits=1.5"], "placement.num_exits=1.5 must be an integer"),
    ("fractional exit stage", ["placement.method=explicit", "placement.stages=[1.5]"],
     "placement.stages=[1.5] must be a list of integers"),
    ("exit convs as a word", ["exit.convs=one"], "exit.convs='one' must be an integer"),
    ("exit width 0", ["exit.width=0"], "exit.width=0 must be an integer >= 1 (or null: the stage's channels)"),
    ("branch stride as a word", ["exit=pteenet", "exit.stride=two"], "exit.stride='two' must be an integer"),
    ("branch width growth as a word", ["exit=pteenet", "exit.width_growth=double"],
     "exit.width_growth='double' must be a finite number"),
    ("lambda as a word", ["loss.second.lambda_coef=big"], "loss.second.lambda_coef='big' must be a finite number"),
    ("warm-up epochs as a word", ["loss.first_epochs=two"], "loss.first_epochs='two' must be an integer"),
    ("fractional ramp epochs", ["loss=multi_ce", "loss.ramp_epochs=1.5"], "loss.ramp_epochs=1.5 must be an integer"),
    ("negative ramp start", ["loss=multi_ce", "loss.ramp_start=-1"], "loss.ramp_start=-1 must be a finite number >= 0"),
    ("distillation temperature as a word", ["loss=eenet_v2_kd", "loss.terms.kd.temperature=warm"],
     "loss.terms.kd.temperature='warm' must be a finite number"),
    *([("GPU accelerator on a machine without one", ["trainer.accelerator=gpu"],
        "trainer.accelerator=gpu: no such device here; available here: auto, cpu")]
      if not (torch.cuda.is_available() or torch.backends.mps.is_available()) else []),
]


def _earlier_run(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text('{"earlier": true}\n')
    (folder / "model.pt").write_bytes(b"weights of an earlier run")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _expect_one_line_exit(fn, cfg, capsys, message):
    with pytest.raises(SystemExit) as code:
        run_job(fn, cfg)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err[0]


@pytest.mark.parametrize("name,overrides,message", TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_train_rows(tmp_path, capsys, monkeypatch, name, overrides, message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    out = tmp_path / "run"
    _earlier_run(out)
    before = snapshot(tmp_path)
    cfg = compose_config(QUICK + overrides, output_dir=out)
    _expect_one_line_exit(train, cfg, capsys, message)
    assert snapshot(tmp_path) == before  # the earlier run's files byte-identical, nothing new


def test_corrupt_data_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (raw / f).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 60)  # a header and nothing else
    cfg = compose_config(QUICK + ["dataset=mnist", f"data_root={tmp_path / 'data'}"],
                         output_dir=tmp_path / "run")
    _expect_one_line_exit(train, cfg, capsys, "could not read dataset 'mnist'")
    assert not (tmp_path / "run").exists()


def test_output_folder_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if os.geteuid() == 0:  # root ignores permission bits: block the folder with a file instead
        blocker = tmp_path / "blocked"
        blocker.write_text("a file where the folder should be")
        out = blocker / "run"
    else:
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "run"
    cfg = compose_config(QUICK, output_dir=out)
    _expect_one_line_exit(train, cfg, capsys, "is not writable")


def test_truncated_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    cfg = compose_config(QUICK + [f"ckpt_path={ckpt}"], output_dir=tmp_path / "run")
    _expect_one_line_exit(train, cfg, capsys, "cannot load")
    assert not (tmp_path / "run").exists()


# ---- eenet-eval --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(compose_config(["trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                          "logger=none", "checkpoint.enabled=false"], output_dir=out))
    return out


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.yaml").write_text((src / "config.yaml").read_text())
    return dst


EVAL_ROWS = [
    ("no calibration target", [], "give exactly one calibration target"),
    ("two calibration targets", ["budget=0.5", "tolerance=1"],
     "give exactly one calibration target: budget=B (average cost fraction), tolerance=D (accuracy points below "
     "the final exit) or min_accuracy=A (got budget=0.5, tolerance=1)"),
    ("three calibration targets", ["budget=0.5", "tolerance=1", "min_accuracy=0.9"],
     "(got budget=0.5, tolerance=1, min_accuracy=0.9)"),
    ("budget of 0", ["budget=0"], "budget=0 must be an average cost fraction in (0, 1] of the backbone's MACs"),
    ("budget in percent", ["budget=50"], "budget=50 must be an average cost fraction in (0, 1]"),
    ("budget as a word", ["budget=half"], "budget='half' must be an average cost fraction in (0, 1]"),
    ("negative tolerance", ["tolerance=-1"], "tolerance=-1 must be accuracy points in [0, 100]"),
    ("tolerance above 100 points", ["tolerance=150"], "tolerance=150 must be accuracy points in [0, 100]"),
    ("tolerance as a word", ["tolerance=small"], "tolerance='small' must be accuracy points in [0, 100]"),
    ("minimum accuracy in percent", ["min_accuracy=90"], "min_accuracy=90 must be a fraction in [0, 1]"),
    ("minimum accuracy as a word", ["min_accuracy=high"], "min_accuracy='high' must be a fraction in [0, 1]"),
    ("unknown policy", ["tolerance=1", "policy=softmax"], "unknown policy 'softmax'; accepted: confidence, "),
    ("no run", ["run=null", "tolerance=1"], "give the training run to evaluate: run=RUN_DIR"),
    ("run folder read as a number", ["run=5", "tolerance=1"],
     "run=5 must be a path, quoted if Hydra would read it as a number or true/false"),
    ("negative grid", ["tolerance=1", "grid=-5"], "grid=-5 must be an integer >= 2 (candidate thresholds per exit)"),
    ("grid of one threshold", ["tolerance=1", "grid=1"], "grid=1 must be an integer >= 2"),
    ("grid as a word", ["tolerance=1", "grid=fine"], "grid='fine' must be an integer >= 2"),
    ("negative thread count", ["tolerance=1", "threads=-1"],
     "threads=-1 must be an integer >= 1 (or null: torch's default)"),
    ("thread count 0", ["tolerance=1", "threads=0"], "threads=0 must be an integer >= 1"),
    ("batch size 0", ["tolerance=1", "batch_size=0"], "batch_size=0 must be an integer >= 1"),
    ("batch size as a word", ["tolerance=1", "batch_size=big"], "batch_size='big' must be an integer >= 1"),
    ("negative timing passes", ["tolerance=1", "timing_passes=-1"],
     "timing_passes=-1 must be an integer >= 0 (0: no timing)"),
    ("fractional timing passes", ["tolerance=1", "timing_passes=1.5"], "timing_passes=1.5 must be an integer >= 0"),
    ("one optimism fold", ["tolerance=1", "optimism_folds=1"],
     "optimism_folds=1 must be 0 (no optimism correction) or a number of folds >= 2"),
    ("optimism repeats 0", ["tolerance=1", "optimism_folds=3", "optimism_repeats=0"],
     "optimism_repeats=0 must be an integer >= 1"),
    ("optimism correction of a budget", ["budget=0.5", "optimism_folds=3"],
     "optimism_folds=3 corrects a tolerance target; give tolerance=D"),
    ("optimism correction of a minimum accuracy", ["min_accuracy=0.9", "optimism_folds=3"],
     "optimism_folds=3 corrects a tolerance target"),
    ("latency as a word", ["tolerance=1", "latency=yes"], "latency='yes' must be true or false"),
    ("W&B settings as a word", ["tolerance=1", "wandb=eenet"],
     "wandb='eenet' must be a mapping such as {project: eenet} (or null: no W&B)"),
    ("data folder read as a number", ["tolerance=1", "data_root=5"], "data_root=5 must be a path"),
    ("overwrite as a word", ["tolerance=1", "++overwrite=yes"], "overwrite='yes' must be true or false"),
]


@pytest.mark.parametrize("name,overrides,message", EVAL_ROWS, ids=[r[0] for r in EVAL_ROWS])
def test_eval_rows(digits_run, tmp_path, capsys, monkeypatch, name, overrides, message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    _earlier_run(tmp_path / "eval")
    before, run_before = snapshot(tmp_path), snapshot(digits_run)
    cfg = compose_config([f"run={digits_run}", *overrides], output_dir=tmp_path / "eval",
                         config_name="eval")
    _expect_one_line_exit(evaluate, cfg, capsys, message)
    assert snapshot(tmp_path) == before  # the earlier evaluation's files byte-identical, nothing new
    assert snapshot(digits_run) == run_before


# ---- eenet-export ------------------------------------------------------------------------------

EXPORT_ROWS = [
    ("no run", ["run=null"], "give the training run to export: run=RUN_DIR"),
    ("run folder read as a number", ["run=5"], "run=5 must be a path, quoted if Hydra would read it as a number"),
    ("opset below what torch exports", ["opset=5"], "opset=5 must be an integer in ["),
    ("opset above what torch exports", ["opset=99"], "opset=99 must be an integer in ["),
    ("opset as a word", ["opset=latest"], "opset='latest' must be an integer in ["),
    ("fractional opset", ["opset=17.5"], "opset=17.5 must be an integer in ["),
    ("negative thread count", ["threads=-1"], "threads=-1 must be an integer >= 1 (or null: torch's default)"),
    ("thread count 0", ["threads=0"], "threads=0 must be an integer >= 1"),
    ("check as a word", ["check=no"], "check='no' must be true or false"),
    ("eval results read as a number", ["thresholds=null", "eval=123"], "eval=123 must be a path"),
    ("output folder read as a number", ["out=5"], "out=5 must be a path"),
    ("data folder read as a number", ["data_root=5"], "data_root=5 must be a path"),
    ("overwrite as a word", ["++overwrite=yes"], "overwrite='yes' must be true or false"),
]


@pytest.mark.parametrize("name,overrides,message", EXPORT_ROWS, ids=[r[0] for r in EXPORT_ROWS])
def test_export_rows(digits_run, tmp_path, capsys, monkeypatch, name, overrides, message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)  # out=5 would be the folder ./5
    out = tmp_path / "onnx"
    _earlier_run(out)
    before, run_before = snapshot(tmp_path), snapshot(digits_run)  # the default out is RUN_DIR/onnx
    cfg = compose_config([f"run={digits_run}", f"out={out}", "thresholds=0.5", *overrides],
                         output_dir=tmp_path / "hydra", config_name="export")
    _expect_one_line_exit(export_run, cfg, capsys, message)
    assert snapshot(tmp_path) == before
    assert snapshot(digits_run) == run_before


def test_every_shipped_config_passes_its_checks():
    """The checks refuse none of eenet's own configurations: every option of the groups whose
    keys they read, every experiment (those that post-train get the backbone.checkpoint their
    comments ask for), the sweep preset, and eval / export with each kind of target."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    conf = config_dir()
    options = [[f"{group}={f.stem}" for f in sorted((conf / group).glob("*.yaml"))]
               for group in ("dataset", "exit", "loss", "optimizer", "scheduler", "trainer", "debug")]
    # the i-th option of every group together (their checked keys do not depend on each other)
    train_sets = [[group[i % len(group)] for group in options] for i in range(max(map(len, options)))]
    train_sets += [[f"experiment={p.relative_to(conf / 'experiment').with_suffix('')}",
                    "backbone.checkpoint=/a/trained/run"]
                   for p in sorted((conf / "experiment").rglob("*.yaml")) if not p.name.startswith("_")]
    train_sets.append(["hparams_search=optuna_budget"])
    eval_sets = [["tolerance=1"], ["budget=0.2", "latency=true", "threads=1"], ["min_accuracy=0.9"],
                 ["tolerance=0.5", "optimism_folds=3", "optimism_repeats=2", "policy=max_prob"]]
    export_sets = [["thresholds=0.5"], ["eval=/a/run/eval/results.json", "out=deploy", "opset=17"]]
    checked = 0
    with initialize_config_module(config_module="eenet.conf", version_base="1.3"):
        for name, check, sets in (("train", check_train_config, train_sets),
                                  ("eval", check_eval_config, [["run=/a/run", *o] for o in eval_sets]),
                                  ("export", check_export_config, [["run=/a/run", *o] for o in export_sets])):
            for overrides in sets:
                cfg = compose(config_name=name, overrides=overrides)
                with open_dict(cfg):
                    cfg.output_dir = "/unused"
                check(cfg)
                checked += 1
    assert checked == len(train_sets) + len(eval_sets) + len(export_sets)
    assert {o for group in options for o in group} <= {o for ov in train_sets for o in ov}


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_config([f"run={tmp_path}", "tolerance=1"], output_dir=tmp_path / "eval",
                         config_name="eval")
    _expect_one_line_exit(evaluate, cfg, capsys, "is not a finished eenet-train run")


def test_eval_refuses_a_pickle_that_would_run_code(digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run = _copy_run(digits_run, tmp_path / "evil")
    marker = tmp_path / "payload_ran"
    (run / "model.pt").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    cfg = compose_config([f"run={run}", "tolerance=1"], output_dir=tmp_path / "eval",
                         config_name="eval")
    _expect_one_line_exit(evaluate, cfg, capsys, "cannot load")
    assert not marker.exists()


def test_eval_of_weights_that_do_not_match_the_config(digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run = _copy_run(digits_run, tmp_path / "mismatch")
    state = torch.load(digits_run / "model.pt", weights_only=True)
    state["exits.0.classifier.weight"] = torch.zeros(3, 3)
    torch.save(state, run / "model.pt")
    cfg = compose_config([f"run={run}", "tolerance=1"], output_dir=tmp_path / "eval",
                         config_name="eval")
    _expect_one_line_exit(evaluate, cfg, capsys, "shape mismatch: exits.0.classifier.weight")


# ---- the command line itself -------------------------------------------------------------------

RESNET20 = config_dir() / "backbone" / "resnet20.yaml"
BROKEN_YAML = "name: [resnet20\nshortcut: conv\n"  # an unclosed list


def _user_folders(root: Path) -> dict[str, Path]:
    """A user's config folders: their own groups, and files named like eenet's (shadows)."""
    own = root / "user_conf" / "backbone"
    own.mkdir(parents=True)
    resnet20 = RESNET20.read_text()
    (own / "my_resnet.yaml").write_text(resnet20 + "widths: [8, 16, 32]\n")
    (own / "broken.yaml").write_text(BROKEN_YAML)
    (own / "typo.yaml").write_text(resnet20 + "depthh: 20\n")
    for name, text in (("shadow_yaml", BROKEN_YAML), ("shadow_key", resnet20 + "depthh: 20\n")):
        (root / name / "backbone").mkdir(parents=True)
        (root / name / "backbone" / "resnet20.yaml").write_text(text)
    return {"USER": root / "user_conf", "SHADOW_YAML": root / "shadow_yaml",
            "SHADOW_KEY": root / "shadow_key", "MISSING": root / "no_such_folder",
            "EVAL": root / "eval"}


SHADOW = "has the name of eenet's own config backbone/resnet20.yaml, which Hydra reads first"

CLI_ROWS = [
    ("unknown config group option", ["eenet.cli.train", "backbone=resnet21"], "error: unknown backbone 'resnet21'"),
    ("unknown loss group option", ["eenet.cli.train", "loss=focal"], "error: unknown loss 'focal'"),
    ("eval of a missing run", ["eenet.cli.eval", "run=/nonexistent/run", "tolerance=1",
                               "hydra.run.dir=EVAL"], "is not a finished eenet-train run"),
    ("config folder that does not exist", ["eenet.cli.train", "--config-dir", "MISSING"],
     "error: config folder MISSING does not exist"),
    ("user file shadowing a built-in, broken YAML", ["eenet.cli.train", "--config-dir", "SHADOW_YAML"],
     f"error: SHADOW_YAML/backbone/resnet20.yaml {SHADOW}"),
    ("user file shadowing a built-in, unknown key", ["eenet.cli.train", "--config-dir=SHADOW_KEY"],
     f"error: SHADOW_KEY/backbone/resnet20.yaml {SHADOW}"),
    ("user file shadowing a built-in, in hydra.searchpath", ["eenet.cli.eval", "run=/x", "tolerance=1",
                                                             "hydra.searchpath=[file://SHADOW_KEY]"],
     f"error: SHADOW_KEY/backbone/resnet20.yaml {SHADOW}"),
    ("unknown option, the user's options listed", ["eenet.cli.train", "--config-dir", "USER", "backbone=resnet21"],
     "error: unknown backbone 'resnet21'; accepted: broken, cifar_densenet40"),
    ("user's own file with broken YAML", ["eenet.cli.train", "--config-dir", "USER", "backbone=broken"],
     "error: USER/backbone/broken.yaml, line 2, column 9: not valid YAML"),
    ("user's own file with an unknown key", ["eenet.cli.train", "--config-dir", "USER", "backbone=typo"],
     "error: backbone: CifarResNet.__init__() got an unexpected keyword argument 'depthh'"),
    ("override of a key that is not in the config", ["eenet.cli.train", "backbone.depthh=3"],
     "error: Could not override 'backbone.depthh'. To append to your config use +backbone.depthh=3"),
    ("option refused by eenet-eval's checks", ["eenet.cli.eval", "run=/nonexistent/run", "tolerance=1", "grid=-5",
                                               "hydra.run.dir=EVAL"], "error: grid=-5 must be an integer >= 2"),
]


def _run_cli(tmp_path: Path, args: list[str], **env_extra: str):
    folders = _user_folders(tmp_path)

    def fill(text: str) -> str:
        for placeholder, folder in folders.items():
            text = text.replace(placeholder, str(folder))
        return text

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **env_extra}
    if "HYDRA_FULL_ERROR" not in env_extra:
        env.pop("HYDRA_FULL_ERROR", None)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", *map(fill, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    return proc, fill, before == snapshot(tmp_path)


@pytest.mark.parametrize("name,args,message", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_rows(tmp_path, name, args, message):
    proc, fill, unchanged = _run_cli(tmp_path, args)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-1500:]
    assert fill(message) in lines[0], lines[0]
    assert unchanged, "a refused command wrote into the working folder or the user's folders"
    if "the user's options" in name:
        assert "my_resnet" in lines[0] and "resnet20" in lines[0]


@pytest.mark.parametrize("args", [["--config-dir", "SHADOW_YAML"],
                                  ["--config-dir", "USER", "backbone=broken"]],
                         ids=["checked before Hydra", "reported by Hydra"])
def test_cli_full_error_shows_the_traceback(tmp_path, args):
    proc, _, _ = _run_cli(tmp_path, ["eenet.cli.train", *args], HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-1500:]


@pytest.mark.parametrize("argv,message", [
    (["-m", "backbone=resnet20,resnet21"], "unknown backbone 'resnet21'"),
    (["loss=two_stage,'focal'"], "unknown loss 'focal'"),
    (["hydra.searchpath=['file://USER']", "backbone=resnet21"], "accepted: broken, "),
    (["hydra.searchpath=[pkg://no_such_package.conf]"], "config package no_such_package.conf"),
    (["hydra.searchpath=[USER]", "backbone=resnet21"], "accepted: broken, "),
    (["-cd", "SHADOW_KEY"], SHADOW),
], ids=["a sweep", "quoted", "searchpath", "searchpath package", "searchpath plain folder", "-cd"])
def test_check_command_line_refuses(tmp_path, argv, message):
    folders = _user_folders(tmp_path)
    argv = [a.replace("USER", str(folders["USER"])).replace("SHADOW_KEY", str(folders["SHADOW_KEY"]))
            for a in argv]
    with pytest.raises(EENetError, match=re.escape(message)):
        check_command_line(argv)


def test_check_command_line_accepts(tmp_path):
    folders = _user_folders(tmp_path)
    copy = tmp_path / "copy" / "backbone"
    copy.mkdir(parents=True)
    (copy / "resnet20.yaml").write_bytes(RESNET20.read_bytes())  # unchanged: nothing is ignored
    for argv in (["--config-dir", str(folders["USER"]), "backbone=my_resnet", "-m", "exit=plain,pool"],
                 [f"hydra.searchpath=[file://{folders['USER']}]", "backbone='my_resnet'"],
                 ["--config-dir", str(copy.parent), "backbone=resnet20"],
                 ["hydra.searchpath=[pkg://eenet.conf]", "backbone=choice(resnet20,resnet32)"],
                 ["--config-path", str(tmp_path), "backbone=anything"]):
        check_command_line(argv)


def test_compose_config_refuses_a_file_it_would_ignore(tmp_path):
    folders = _user_folders(tmp_path)
    cfg = compose_config(["backbone=my_resnet"], output_dir=tmp_path / "run",
                         config_dirs=[folders["USER"]])
    assert list(cfg.backbone.widths) == [8, 16, 32]
    with pytest.raises(EENetError, match=re.escape(SHADOW)):
        compose_config([], output_dir=tmp_path / "run", config_dirs=[folders["SHADOW_KEY"]])


def test_model_and_engine_inputs_of_the_wrong_shape():
    from eenet.inference import DynamicEngine
    from eenet.policies import create_policy
    from eenet.runs import build_network

    net = build_network(compose_config(QUICK, output_dir="unused"), (1, 8, 8)).eval()
    with pytest.raises(EENetError, match=r"expected \(batch, 1, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8))
    engine = DynamicEngine(net, create_policy("confidence", 0.5))
    with pytest.raises(EENetError, match=r"expected \(batch, 1, 8, 8\)"):
        engine(torch.zeros(2, 1, 9, 9))
    net.train()
    with pytest.raises(EENetError, match="eval mode only"):
        engine(torch.zeros(2, 1, 8, 8))
