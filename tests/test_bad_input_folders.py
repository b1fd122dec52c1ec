"""Output folders: never clobbered, marked while incomplete, one writer at a time.

Every refusal is checked the same way: exit code 2, exactly one line on stderr that
starts with ``error: `` (no traceback), and every entry that was in the target folder
before is byte-identical afterwards, with nothing new (:func:`snapshot`). In-process
cases go through :func:`eenet.cli.common.run_job`, what the commands call once Hydra
composed the config; the others run the commands themselves.

One digits run is trained per module (1 epoch, 200 training samples); each case works
on a copy of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import eenet.jobs.train as train_job
from eenet.cli.common import run_job
from eenet.config import compose_config
from eenet.errors import EENetError
from eenet.io import atomic_write_text
from eenet.jobs.evaluate import evaluate
from eenet.jobs.export import export_run
from eenet.jobs.train import train
from eenet.run_folder import MARKER, claim_output_folder
from eenet.training.module import EarlyExitModule
from folder_state import snapshot  # tests/ is on sys.path

RECIPE = ["trainer.max_epochs=1", "dataset.datamodule.train_subset=200", "logger=none",
          "trainer.enable_progress_bar=false", "anytime=false", "threads=1",
          "trainer.accelerator=cpu"]
EVAL = ["tolerance=1", "timing_passes=0", "threads=1"]
EVAL_OUTPUTS = ("results.json", "results.md", "curve.png", "exits.png", "reliability.png")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folders") / "run"
    train(compose_config(RECIPE, output_dir=out))
    return out


def copy_run(digits_run: Path, folder: Path) -> Path:
    shutil.copytree(digits_run, folder)
    return folder


def one_error_line(stderr: str, *parts: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def refused_in_process(job, cfg, capsys, *parts: str) -> str:
    with pytest.raises(SystemExit) as code:
        run_job(job, cfg)
    assert code.value.code == 2
    return one_error_line(capsys.readouterr().err, *parts)


def env() -> dict:
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    e.pop("HYDRA_FULL_ERROR", None)
    return e


def command(module: str, *args: str, cwd: Path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"eenet.cli.{module}", *args], env=env(),
                          cwd=cwd, capture_output=True, text=True, timeout=600, **popen)


def start(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"eenet.cli.{module}", *args], env=env(),
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def eval_config(run: Path, out: Path, *extra: str):
    return compose_config([f"run={run}", *EVAL, *extra], output_dir=out, config_name="eval")


def export_config(run: Path, out: Path, *extra: str):
    return compose_config([f"run={run}", "thresholds=0.9", f"out={out}", "threads=1", *extra],
                          config_name="export")


@pytest.fixture(autouse=True)
def _one_line_errors(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


# ---- eenet-train: a finished or started run is refused, resumed only as the same run -------------

def test_train_into_a_finished_run_is_refused_on_the_command_line(digits_run, tmp_path):
    """The reported command: a typo'd trainer key and another backbone, into a finished run."""
    run = copy_run(digits_run, tmp_path / "run")
    before = snapshot(run)
    proc = command("train", "+trainer.max_epoch=3", "backbone=resnet32", f"hydra.run.dir={run}",
                   "logger=none", "threads=1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, f"{run} already holds an eenet-train run", "config.yaml",
                   "resume=true", "overwrite=true")
    assert snapshot(run) == before


def test_train_api_refuses_a_finished_run_and_overwrite_replaces_it(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(EENetError, match="already holds an eenet-train run"):
        train(compose_config(RECIPE + ["backbone=resnet32"], output_dir=run))
    assert snapshot(run) == before
    refused_in_process(train, compose_config(RECIPE, output_dir=run), capsys,
                       "already holds an eenet-train run")
    assert snapshot(run) == before
    # overwrite=true: a new run replaces it (the new config, no marker left)
    train(compose_config(RECIPE + ["overwrite=true", "seed=1"], output_dir=run))
    assert "seed: 1" in (run / "config.yaml").read_text()
    assert not (run / MARKER).exists() and (run / "results.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


class Crash(RuntimeError):
    pass


def test_a_killed_training_run_is_started_refused_and_resumed(tmp_path, capsys, monkeypatch):
    """A run that stopped mid-training is marked started; it is refused without resume=true,
    and with resume=true only under its own configuration."""
    run = tmp_path / "started"
    recipe = [o for o in RECIPE if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=2"]
    original = EarlyExitModule.training_step

    def step(self, batch, batch_idx):  # 200 samples, batch 128: 2 steps per epoch
        if self.global_step == 2:
            raise Crash("stopped in the second epoch")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EarlyExitModule, "training_step", step)
    with pytest.raises(Crash):
        train(compose_config(recipe, output_dir=run))
    monkeypatch.undo()
    assert (run / MARKER).is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "results.json").exists() and not (run / "model.pt").exists()
    before = snapshot(run)

    refused_in_process(train, compose_config(recipe, output_dir=run), capsys,
                       "holds a started eenet-train run that did not finish", "resume=true")
    assert snapshot(run) == before
    refused_in_process(train, compose_config(recipe + ["resume=true", "loss.second.lambda_coef=2"],
                                             output_dir=run), capsys,
                       "differs from its config.yaml: loss.second.lambda_coef: 2 here, 1.0 in the run")
    assert snapshot(run) == before
    refused_in_process(train, compose_config(recipe + ["resume=true", "backbone=resnet32"],
                                             output_dir=run), capsys, "backbone.name: 'resnet32' here")
    assert snapshot(run) == before

    # the same run continues (threads and the progress bar may differ), and is then complete
    results, _ = train(compose_config(recipe + ["resume=true", "threads=2"], output_dir=run))
    assert results["resumed_from"].endswith("last.ckpt") and results["epochs"] == 2
    assert not (run / MARKER).exists() and (run / "results.json").is_file()


# ---- eenet-eval and eenet-export: a new or empty folder, or refused ------------------------------

def test_eval_into_a_complete_folder_is_refused(digits_run, tmp_path, capsys):
    out = tmp_path / "eval"
    evaluate(eval_config(digits_run, out))
    assert sorted(p.name for p in out.iterdir()) == sorted(EVAL_OUTPUTS)
    before = snapshot(out)
    refused_in_process(evaluate, eval_config(digits_run, out), capsys,
                       f"{out} is not empty (it holds results.json", "overwrite=true")
    assert snapshot(out) == before
    # a training run's folder is not an evaluation's
    run = copy_run(digits_run, tmp_path / "run")
    run_before = snapshot(run)
    refused_in_process(evaluate, eval_config(run, run), capsys, f"{run} is not empty")
    assert snapshot(run) == run_before
    # overwrite=true replaces the earlier evaluation
    evaluate(eval_config(digits_run, out, "overwrite=true", "latency=true"))
    assert sorted(p.name for p in out.iterdir()) == sorted([*EVAL_OUTPUTS, "latency.json"])


def test_eval_of_an_eval_folder_leaves_nothing_behind(digits_run, tmp_path):
    """``run=`` an evaluation's folder: one line, and no eval/<time> made inside it (nor a
    folder anywhere for a ``run=`` that does not exist)."""
    run = copy_run(digits_run, tmp_path / "run")
    evaluate(eval_config(run, run / "eval" / "first"))
    before = snapshot(run)
    procs = [start("eval", f"run={run / 'eval' / 'first'}", *EVAL, cwd=tmp_path),
             start("eval", f"run={tmp_path / 'nothing' / 'run'}", *EVAL, cwd=tmp_path)]
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 2, stderr[-3000:]
        one_error_line(stderr, "is not a finished eenet-train run: config.yaml is missing")
    assert snapshot(run) == before
    assert not (tmp_path / "nothing").exists()


def test_eval_of_a_read_only_run_folder_gives_one_line(digits_run, tmp_path):
    run = copy_run(digits_run, tmp_path / "run")
    if os.geteuid() == 0:  # root ignores permission bits: a file where eval/ would go blocks it
        (run / "eval").write_text("a file where the eval folder would go\n")
        reason = f"{run / 'eval'} is a file, not a folder"
    else:
        run.chmod(0o555)
        reason = "Permission denied"
    before = snapshot(run)
    try:
        proc = command("eval", f"run={run}", *EVAL, cwd=tmp_path)
    finally:
        run.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, f"output folder {run / 'eval'}", "is not writable", reason,
                   "hydra.run.dir=DIR")
    assert snapshot(run) == before


def test_export_into_a_file_or_an_earlier_export_is_refused(digits_run, tmp_path, capsys):
    afile = tmp_path / "deploy.onnx"
    afile.write_text("a file of the user's\n")
    refused_in_process(export_run, export_config(digits_run, afile), capsys,
                       f"out={afile} is a file, not a folder")
    assert afile.read_text() == "a file of the user's\n"
    out = tmp_path / "deploy"
    export_run(export_config(digits_run, out))
    before = snapshot(out)
    assert "manifest.json" in before and MARKER not in before
    refused_in_process(export_run, export_config(digits_run, out, "policy=max_prob"), capsys,
                       f"{out} is not empty (it holds manifest.json", "out=DIR", "overwrite=true")
    assert snapshot(out) == before
    export_run(export_config(digits_run, out, "policy=max_prob", "overwrite=true"))
    assert json.loads((out / "manifest.json").read_text())["policy"]["name"] == "max_prob"
    assert set(snapshot(out)) == set(before)


@pytest.mark.slow  # two eenet-eval processes, 7 s
def test_an_unquoted_non_ascii_run_path_works(digits_run, tmp_path):
    run = copy_run(digits_run, tmp_path / "données" / "run")
    proc = command("eval", f"run={run}", *EVAL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(run.glob("eval/*/results.json"))
    assert len(results) == 1
    assert Path(json.loads(results[0].read_text())["run"]) == run.resolve()
    # where quoting would change what Hydra reads (a list, a sweep), one line says how to quote
    proc = command("eval", f"run=[{run}]", *EVAL, cwd=tmp_path)
    assert proc.returncode == 2
    one_error_line(proc.stderr, "Hydra reads characters outside ASCII only inside quotes")


# ---- file modes: what the user's umask gives, not mkstemp's 0600 ---------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_of_the_umask(digits_run, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "plain.txt", "x\n")
        out = tmp_path / "eval"
        evaluate(eval_config(digits_run, out))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "plain.txt", *out.iterdir()]}
    assert modes == {name: mode for name in ["plain.txt", *EVAL_OUTPUTS]}, {
        k: oct(v) for k, v in modes.items()}


# ---- logs redirected to a file: no progress bar, no Lightning advertisement ----------------------

def test_a_redirected_log_has_no_progress_bar_and_no_tip(tmp_path):
    """A real eenet-train with stdout (and stderr) in a file: no bar, no tip; the same with
    trainer.enable_progress_bar=true given shows the bar, so the signs looked for are real."""
    args = ["trainer.max_epochs=1", "dataset.datamodule.train_subset=200", "logger=csv",
            "threads=1", "anytime=false"]
    runs = {"default": [], "asked": ["trainer.enable_progress_bar=true"]}
    procs = {}
    for name, extra in runs.items():
        with open(tmp_path / f"{name}.log", "w") as f:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "eenet.cli.train", *args, *extra,
                 f"hydra.run.dir={tmp_path / name}"], env=env(), cwd=tmp_path, stdout=f,
                stderr=subprocess.STDOUT)
    logs = {}
    for name, p in procs.items():
        assert p.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        logs[name] = (tmp_path / f"{name}.log").read_text()
        assert "Results written to" in logs[name]
        assert "Tip:" not in logs[name] and "litlogger" not in logs[name]
    for sign in ("it/s", "━", "Epoch 0"):
        assert sign not in logs["default"], sign
        assert sign in logs["asked"], sign


def test_the_progress_bar_is_off_when_stdout_is_not_a_terminal_unless_asked():
    from eenet.cli.train import progress_bar_off

    assert progress_bar_off([], tty=False)
    assert progress_bar_off(["trainer.max_epochs=1"], tty=False)
    assert not progress_bar_off([], tty=True)
    for given in ("trainer.enable_progress_bar=true", "+trainer.enable_progress_bar=true",
                  "trainer.enable_progress_bar=false"):
        assert not progress_bar_off([given], tty=False)


def test_lightning_advertises_without_the_filter(tmp_path):
    """The filter is what keeps the tip out (Lightning 2.6 logs it on every Trainer)."""
    import lightning as L

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero",
                                              "lightning.fabric.utilities.rank_zero")]
    filters = {lg.name: [f for f in lg.filters if isinstance(f, train_job._NoAdvertising)]
               for lg in loggers}
    assert all(filters.values())
    for lg in loggers:
        lg.addHandler(handler)
    try:
        L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
        assert not any("Tip:" in str(r.msg) for r in records)
        for lg in loggers:
            for f in filters[lg.name]:
                lg.removeFilter(f)
        L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
        assert any("litlogger" in str(r.msg) for r in records)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
            for f in filters[lg.name]:
                lg.addFilter(f)


# ---- a killed eenet-eval leaves a folder marked incomplete; a rerun completes it -----------------

# Runs eenet-eval and stops the process (SIGSTOP) at one moment, where the test kills it:
# "folder" right after its folder appeared, "computing" when it starts to calibrate (the
# folder claimed), "results" just before results.json (every other file written).
STOP_AT = """
import os, signal, sys
moment = sys.argv.pop(1)
sys.argv[0] = "eenet-eval"

def stop_at(module, name, after):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        if not after:
            os.kill(os.getpid(), signal.SIGSTOP)
        result = original(*args, **kwargs)
        if after:
            os.kill(os.getpid(), signal.SIGSTOP)
        return result
    setattr(module, name, wrapper)

import eenet.run_folder
import eenet.jobs.evaluate
if moment == "folder":
    stop_at(eenet.run_folder, "create_output_folder", after=True)
elif moment == "computing":
    stop_at(eenet.jobs.evaluate, "Calibrator", after=False)
else:
    stop_at(eenet.jobs.evaluate, "write_results", after=False)
from eenet.cli.eval import main
main()
"""


def test_a_killed_eval_leaves_its_folder_marked_and_a_rerun_completes_it(digits_run, tmp_path):
    moments = {"folder": [MARKER], "computing": [MARKER],
               "results": [MARKER, "curve.png", "exits.png", "reliability.png", "latency.json"]}
    procs = {m: subprocess.Popen([sys.executable, "-c", STOP_AT, m, f"run={digits_run}", *EVAL,
                                  "latency=true", f"hydra.run.dir={tmp_path / m}"],
                                 env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
             for m in moments}
    for m, p in procs.items():
        _, status = os.waitpid(p.pid, os.WUNTRACED)  # returns once it stopped (or ended)
        if not os.WIFSTOPPED(status):
            pytest.fail(f"{m}: eenet-eval ended before the moment: {p.stderr.read()[-3000:]}")
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        assert p.returncode == -signal.SIGKILL
    for m, left in moments.items():
        folder = tmp_path / m
        assert sorted(p.name for p in folder.iterdir()) == sorted(left), m
        assert "job: eenet-eval" in (folder / MARKER).read_text()
        evaluate(eval_config(digits_run, folder, "latency=true"))  # the rerun takes it over
        assert sorted(p.name for p in folder.iterdir()) == sorted([*EVAL_OUTPUTS, "latency.json"])
    assert not list(tmp_path.glob(".*"))  # no temporary folder left beside them


# ---- two writers: exactly one writes, the other refuses in one line ------------------------------

def test_two_evals_into_one_folder_one_writes(digits_run, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    args = [f"run={digits_run}", *EVAL, f"hydra.run.dir={out}"]
    # deterministic first: while the folder is claimed (by this process), eenet-eval refuses it
    with claim_output_folder(out, "eenet-eval", EVAL_OUTPUTS) as held:
        proc = command("eval", *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        one_error_line(proc.stderr, f"{out} is being written by another eenet-eval "
                                    f"(pid {os.getpid()}")
        assert [p.name for p in out.iterdir()] == [MARKER]
        held.abandon()  # wrote nothing: the marker goes, the (earlier) folder stays
    assert out.is_dir() and not any(out.iterdir())
    # then both at once: whichever claims the folder first writes, the other refuses
    procs = [start("eval", *args, cwd=tmp_path) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=600), p.stderr.read()) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    (ok, ok_err), (refused, refused_err) = outcomes
    assert (ok, refused) == (0, 2), outcomes
    one_error_line(refused_err, str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(EVAL_OUTPUTS)


def test_export_refuses_a_folder_another_export_is_writing(digits_run, tmp_path):
    out = tmp_path / "deploy"
    with claim_output_folder(out, "eenet-export", ("manifest.json",), key="out") as held:
        proc = command("export", f"run={digits_run}", "thresholds=0.9", f"out={out}",
                       "threads=1", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        one_error_line(proc.stderr, f"{out} is being written by another eenet-export", "out=DIR")
        assert [p.name for p in out.iterdir()] == [MARKER]
        held.abandon()
    assert not out.exists()  # made by the claim above, empty: removed with it


def test_an_exported_digits_run_refuses_raw_0_to_16_values(digits_run, tmp_path):
    """The reported case: sklearn's digits are 0..16, the network was trained on them divided
    by 16. eenet-export records the data set's value range, and the runner refuses raw values
    on another scale in one line instead of classifying them (80 % instead of 100 % before)."""
    from sklearn.datasets import load_digits

    from eenet.export.onnx_runner import OnnxEarlyExitRunner, RunnerError

    out = tmp_path / "deploy"
    manifest = export_run(export_config(digits_run, out))
    assert json.loads(Path(manifest).read_text())["input_range"] == [0.0, 1.0]
    runner = OnnxEarlyExitRunner(manifest, threads=1)
    raw = load_digits().images[:16].astype("float32")[:, None]  # values 0..16
    with pytest.raises(RunnerError, match=r"values in \[0, 16\] but the model was trained on \[0, 1\]"):
        runner.preprocess(raw)
    assert runner.preprocess(raw / 16).shape == raw.shape  # the same images, rescaled: accepted
