"""Run folders someone sends you run no code: eenet-eval and eenet-export on planted configs.

A real finished run is made once. Each case copies it and plants, in its
``config.yaml``, a ``_target_`` that would run code or write a file: a pickle
read by ``numpy.load(allow_pickle=True)``, ``torch.load(weights_only=False)`` or
``joblib.load``, a ``hubconf.py`` imported by ``torch.hub.load(source="local")``,
or ``builtins.open(path, "w")``, which truncates a file. Unpickling the payload
(or importing the hubconf) creates a marker folder, so the detector is the
marker itself; ``test_the_payloads_are_real`` switches the allow-list off
in-process and sees every payload run, so the checks below can fail.

Refused means: exit code 2, exactly one line on stderr (``error: ...``, naming the
target), no marker, every file of the run folder (and the file ``open`` aimed at)
byte-identical, nothing new in the run folder (no empty ``eval/<time>`` from
Hydra) and no export folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import eenet.config
import eenet.runs
from eenet.cli.common import run_job
from eenet.config import compose_config
from eenet.errors import EENetError
from eenet.export.onnx_runner import OnnxEarlyExitRunner
from eenet.io import safe_pickle_load
from eenet.jobs.evaluate import evaluate
from eenet.jobs.export import export_run
from eenet.jobs.train import train
from eenet.runs import load_run
from folder_state import snapshot  # tests/ is on sys.path

# A tiny digits run with one early exit, so that ``thresholds=[0.9]`` fits it.
RECIPE = ["trainer.max_epochs=1", "dataset.datamodule.train_subset=200", "logger=none",
          "trainer.enable_progress_bar=false", "checkpoint.enabled=false",
          "placement.num_exits=1", "anytime=false", "threads=1"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safe_runs") / "run"
    train(compose_config(RECIPE, output_dir=out))
    return out


class MakeMarker:
    """Unpickling this calls ``os.mkdir(marker)``: the marker exists iff the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def payload_node(route: str, folder: Path, marker: Path, victim: Path) -> dict:
    """The planted config node for ``route``; writes the payload file it reads into ``folder``."""
    if route == "numpy.load":
        (folder / "payload.pkl").write_bytes(pickle.dumps(MakeMarker(marker)))
        return {"_target_": "numpy.load", "file": str(folder / "payload.pkl"),
                "allow_pickle": True}
    if route == "torch.load":
        torch.save(MakeMarker(marker), folder / "payload.pt")
        return {"_target_": "torch.load", "f": str(folder / "payload.pt"), "weights_only": False}
    if route == "joblib.load":
        joblib.dump(MakeMarker(marker), folder / "payload.joblib")
        return {"_target_": "joblib.load", "filename": str(folder / "payload.joblib")}
    if route == "torch.hub.load":
        (folder / "hubconf.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n\n\n"
                                           "def net():\n    return None\n")
        return {"_target_": "torch.hub.load", "repo_or_dir": str(folder), "model": "net",
                "source": "local"}
    if route == "builtins.open":
        return {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    raise ValueError(route)


def plant(cfg, place: str, node: dict) -> None:
    if place == "dataset.datamodule":
        cfg.dataset.datamodule = node
    elif place == "backbone.shortcut":  # nested: built before the backbone itself
        cfg.backbone.shortcut = node
    elif place == "dataset.datamodule.augment[0]":  # nested in a list
        cfg.dataset.datamodule.augment = [node]
    else:
        raise ValueError(place)


ROUTES = ["numpy.load", "torch.load", "joblib.load", "torch.hub.load", "builtins.open"]
CASES = [(route, "dataset.datamodule") for route in ROUTES] + [
    ("numpy.load", "backbone.shortcut"), ("builtins.open", "backbone.shortcut"),
    ("torch.hub.load", "dataset.datamodule.augment[0]"),
    ("joblib.load", "dataset.datamodule.augment[0]")]
IDS = [f"{route}@{place}" for route, place in CASES]


class Evil:
    """A copy of the run with a payload planted, and what must stay as it is."""

    def __init__(self, run: Path, tmp: Path, route: str, place: str):
        self.route, self.place = route, place
        self.folder = tmp / "evil_run"
        shutil.copytree(run, self.folder)
        self.marker = tmp / "payload_ran"
        self.victim = tmp / "victim.txt"
        self.victim.write_text("a file of the user's that open(path, 'w') would truncate\n")
        cfg = OmegaConf.load(self.folder / "config.yaml")
        plant(cfg, place, payload_node(route, self.folder, self.marker, self.victim))
        OmegaConf.save(cfg, self.folder / "config.yaml")
        self.before = snapshot(self.folder)
        self.victim_hash = sha256(self.victim)

    def payload_ran(self) -> bool:
        return self.marker.exists() or sha256(self.victim) != self.victim_hash

    def assert_untouched(self) -> None:
        assert not self.payload_ran()
        assert snapshot(self.folder) == self.before  # same files, same bytes, nothing new


def assert_one_error_line(stderr: str, *parts: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for part in parts:
        assert part in lines[0], lines[0]


# ---- the detector is real: without the allow-list every payload runs ----------------------------

@pytest.mark.parametrize("route,place", CASES, ids=IDS)
def test_the_payloads_are_real(digits_run, tmp_path, monkeypatch, route, place):
    evil = Evil(digits_run, tmp_path, route, place)
    load_run(digits_run)  # the untouched run loads
    monkeypatch.setattr(eenet.runs, "check_run_folder", eenet.runs.read_run_config)
    monkeypatch.setattr(eenet.config, "check_targets", lambda *a, **k: None)
    with pytest.raises(Exception):  # the payload runs, then building fails on what it returned
        load_run(evil.folder)
    assert evil.payload_ran()


# ---- refused in-process: the jobs behind eenet-eval and eenet-export -----------------------------

@pytest.mark.parametrize("route,place", CASES, ids=IDS)
def test_jobs_refuse_the_payload(digits_run, tmp_path, capsys, monkeypatch, route, place):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    evil = Evil(digits_run, tmp_path, route, place)
    out = tmp_path / "out"
    jobs = [(evaluate, compose_config([f"run={evil.folder}", "tolerance=1"], output_dir=out,
                                      config_name="eval")),
            (export_run, compose_config([f"run={evil.folder}", "policy=max_prob",
                                         "thresholds=[0.9]", f"out={out}"],
                                        config_name="export"))]
    for job, cfg in jobs:
        with pytest.raises(SystemExit) as code:
            run_job(job, cfg)
        assert code.value.code == 2
        assert_one_error_line(capsys.readouterr().err, f"{place}._target_ '{route}'")
        evil.assert_untouched()
        assert not out.exists()


# ---- refused on the command line -----------------------------------------------------------------

def cli_env() -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_both(run: Path, out: Path, cwd: Path, eval_module: list[str] | None = None):
    """``eenet-eval run=RUN tolerance=1`` and ``eenet-export run=RUN ... out=OUT``, side by side."""
    commands = [eval_module or ["-m", "eenet.cli.eval"],
                ["-m", "eenet.cli.export"]]
    args = [[f"run={run}", "tolerance=1"],
            [f"run={run}", "policy=max_prob", "thresholds=[0.9]", f"out={out}", "threads=1"]]
    procs = [subprocess.Popen([sys.executable, *cmd, *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd)
             for cmd, a in zip(commands, args)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        results.append((p.returncode, stdout, stderr))
    return results


def check_cli_refusal(digits_run: Path, tmp_path: Path, route: str, place: str) -> None:
    evil = Evil(digits_run, tmp_path, route, place)
    out = tmp_path / "export"
    for code, _, stderr in run_both(evil.folder, out, tmp_path):
        assert code == 2, stderr[-3000:]
        assert_one_error_line(stderr, f"{place}._target_ '{route}'")
    evil.assert_untouched()
    assert not out.exists()


@pytest.mark.slow  # in make test: every route refused in-process, one refusal on the command line
def test_cli_refuses_numpy_load_pickle(digits_run, tmp_path):
    check_cli_refusal(digits_run, tmp_path, "numpy.load", "dataset.datamodule")


@pytest.mark.slow
@pytest.mark.parametrize("route,place", CASES, ids=IDS)
def test_cli_refuses_every_route(digits_run, tmp_path, route, place):
    check_cli_refusal(digits_run, tmp_path, route, place)


def test_cli_refuses_weights_that_would_run_code(digits_run, tmp_path):
    run = tmp_path / "evil_weights"
    shutil.copytree(digits_run, run)
    marker = tmp_path / "payload_ran"
    (run / "model.pt").write_bytes(pickle.dumps({"w": MakeMarker(marker)}))
    before = snapshot(run)
    out = tmp_path / "export"
    for code, _, stderr in run_both(run, out, tmp_path):
        assert code == 2, stderr[-3000:]
        assert_one_error_line(stderr, "cannot load", "model.pt safely (weights_only=True)")
    assert not marker.exists() and snapshot(run) == before and not out.exists()


def test_hydra_full_error_shows_the_traceback(digits_run, tmp_path, monkeypatch):
    evil = Evil(digits_run, tmp_path, "numpy.load", "dataset.datamodule")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    cfg = compose_config([f"run={evil.folder}", "tolerance=1"], output_dir=tmp_path / "out",
                         config_name="eval")
    with pytest.raises(EENetError, match="'numpy.load' is not one of the classes"):
        run_job(evaluate, cfg)  # raised, not turned into one line and exit code 2
    evil.assert_untouched()


def test_without_its_own_folder_making_hydra_leaves_an_eval_folder(digits_run, tmp_path):
    """The snapshot comparison sees what Hydra writes: with eenet's making of the output
    folder switched off (eenet.run_folder, which also removes the folder of a refused
    job), Hydra makes ``eval/<time>`` empty, the job still refuses the run, and the empty
    folder is left."""
    evil = Evil(digits_run, tmp_path, "numpy.load", "dataset.datamodule")
    no_early_check = ["-c", "import sys, eenet.run_folder as f, eenet.cli.eval as m; "
                      "f.create_output_folder = lambda *a, **k: False; "
                      "sys.argv[0] = 'eenet-eval'; m.main()"]
    (code, _, stderr), _ = run_both(evil.folder, tmp_path / "export", tmp_path, no_early_check)
    assert code == 2
    assert_one_error_line(stderr, "'numpy.load'")
    assert not evil.payload_ran()
    added = set(snapshot(evil.folder)) - set(evil.before)
    assert added and all(p.startswith("eval") for p in added), added


def test_cli_evaluates_and_exports_the_untouched_copy(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    before = snapshot(run)
    out = tmp_path / "export"
    (eval_code, eval_out, eval_err), (export_code, export_out, export_err) = run_both(
        run, out, tmp_path)
    assert eval_code == 0, eval_err[-3000:]
    assert "Calibrated on val for tolerance 1.0 points" in eval_out
    assert export_code == 0, export_err[-3000:]
    assert "Exported 2 exits" in export_out and (out / "manifest.json").is_file()
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
    results = [p for p in after if p.startswith("eval/") and p.endswith("/results.json")]
    assert len(results) == 1, sorted(after)


# ---- what a run folder's config may say, beyond foreign callables --------------------------------

def copy_with(digits_run: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited_run"
    shutil.copytree(digits_run, folder)
    cfg = OmegaConf.load(folder / "config.yaml")
    edit(cfg)
    OmegaConf.save(cfg, folder / "config.yaml")
    return folder


def test_an_allowed_callable_nested_where_nothing_is_built_is_refused(digits_run, tmp_path,
                                                                      monkeypatch):
    """``wandb_logger`` is one of eenet's own callables, but not inside the data set: there it
    would create its save_dir (and could start a W&B run) when the data module is built."""
    made = tmp_path / "made_by_the_config"
    node = {"_target_": "eenet.reporting.wandb.wandb_logger", "save_dir": str(made)}
    folder = copy_with(digits_run, tmp_path,
                       lambda c: setattr(c.dataset.datamodule, "augment", [node]))
    with pytest.raises(EENetError, match=r"dataset\.datamodule\.augment\[0\]\._target_ "
                                         r"'eenet\.reporting\.wandb\.wandb_logger'"):
        load_run(folder)
    assert not made.exists()
    # the global allow-list alone would let it through, and it would write
    monkeypatch.setattr(eenet.runs, "check_run_folder", eenet.runs.read_run_config)
    with pytest.raises(Exception):
        load_run(folder)
    assert made.is_dir()


@pytest.mark.parametrize("value", ["${oc.env:HOME}", "???"])
def test_interpolations_and_missing_values_are_refused(digits_run, tmp_path, capsys, monkeypatch,
                                                       value):
    """eenet-train writes config.yaml resolved: ``${...}`` (here reading the environment) and
    ``???`` are refused in one line, not resolved or raised as a traceback."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    folder = copy_with(digits_run, tmp_path, lambda c: setattr(c.dataset, "name", value))
    cfg = compose_config([f"run={folder}", "tolerance=1"], output_dir=tmp_path / "out",
                         config_name="eval")
    with pytest.raises(SystemExit):
        run_job(evaluate, cfg)
    assert_one_error_line(capsys.readouterr().err, "dataset.name is not a plain value")
    assert not (tmp_path / "out").exists()


def test_a_sent_post_trained_run_does_not_read_its_backbone_checkpoint(digits_run, tmp_path):
    """model.pt holds the whole network: the backbone file a post-trained run started from
    (named in its config, absent or hostile here) is not read again."""
    marker = tmp_path / "payload_ran"
    hostile = tmp_path / "backbone.pt"
    hostile.write_bytes(pickle.dumps({"w": MakeMarker(marker)}))
    for i, checkpoint in enumerate((tmp_path / "not_here", hostile)):
        folder = copy_with(digits_run, tmp_path / f"case{i}",
                           lambda c: setattr(c.backbone, "checkpoint", str(checkpoint)))
        cfg, _, net, _ = load_run(folder)
        assert cfg.backbone.checkpoint == str(checkpoint)  # reported as the run recorded it
        assert net.num_exits == 2
    assert not marker.exists()


# ---- the weights: backbone.checkpoint and resume read tensors only -------------------------------

def test_backbone_checkpoint_with_a_pickle_payload_is_refused(digits_run, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    evil = tmp_path / "evil_backbone"
    shutil.copytree(digits_run, evil)
    marker = tmp_path / "payload_ran"
    (evil / "model.pt").write_bytes(pickle.dumps({"backbone.w": MakeMarker(marker)}))
    out = tmp_path / "post"
    cfg = compose_config(RECIPE + ["mode=posttrain", f"backbone.checkpoint={evil}"],
                         output_dir=out)
    with pytest.raises(SystemExit) as code:
        run_job(train, cfg)
    assert code.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "cannot load", "safely (weights_only=True)")
    assert not marker.exists() and not out.exists()
    with open(evil / "model.pt", "rb") as f:  # plain unpickling runs it: the test is real
        pickle.load(f)
    assert marker.is_dir()


def test_resume_from_a_last_ckpt_with_a_pickle_payload_is_refused(digits_run, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    marker = tmp_path / "payload_ran"
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {"w": MakeMarker(marker)}, "epoch": 0},
               run / "checkpoints" / "last.ckpt")
    before = snapshot(run)
    recipe = [o for o in RECIPE if not o.startswith("checkpoint.")]
    cfg = compose_config(recipe + ["resume=true"], output_dir=run)
    with pytest.raises(SystemExit) as code:
        run_job(train, cfg)
    assert code.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "cannot load", "last.ckpt")
    assert not marker.exists()
    assert snapshot(run) == before  # the earlier run is left as it was
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # the test is real
    assert marker.is_dir()


# ---- data files a run folder's config points at: CIFAR's pickle batches --------------------------

CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta"]


def test_a_cifar_root_with_a_pickle_payload_is_refused(digits_run, tmp_path):
    """The data root is data of the run folder; CIFAR's batches are pickles, read with
    :func:`eenet.io.safe_pickle_load`, so a planted batch cannot run code."""
    marker = tmp_path / "payload_ran"
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for name in CIFAR10_FILES:
        (root / "cifar-10-batches-py" / name).write_bytes(
            pickle.dumps({"data": MakeMarker(marker), "labels": [0]}))

    def edit(cfg):
        cfg.dataset.datamodule.update(name="cifar10", root=str(root), mean=[0.5] * 3,
                                      std=[0.25] * 3)

    folder = copy_with(digits_run, tmp_path, edit)
    with pytest.raises(EENetError, match=r"could not read dataset 'cifar10' file .*data_batch_1: "
                                         r"UnpicklingError: refused to load global"):
        load_run(folder)
    assert not marker.exists()
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        pickle.load(f)  # plain unpickling runs it: the test is real
    assert marker.is_dir()


def test_safe_pickle_load_reads_numpy_arrays_of_numpy_1_and_2():
    """CIFAR batches were written by old numpy (``numpy.core``); numpy 2 writes ``numpy._core``."""
    batch = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [3, 7],
             "batch_label": "training batch 1 of 5", "n": np.int64(2)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(batch, protocol=protocol)
        forms = [data]
        if protocol <= 2:  # GLOBAL opcodes are text: rewrite them as numpy 1 wrote them
            old = data.replace(b"numpy._core.", b"numpy.core.")
            assert old != data and b"numpy.core.multiarray" in old
            pickletools.dis(old, out=io.StringIO())  # still a valid pickle
            forms.append(old)
        for form in forms:
            got = safe_pickle_load(io.BytesIO(form), encoding="latin1")
            np.testing.assert_array_equal(got["data"], batch["data"])
            assert got["labels"] == [3, 7] and got["n"] == 2
            assert got["batch_label"] == batch["batch_label"]


# ---- the exported manifest is data: piece names must stay inside the export folder ---------------

@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "onnx"
    export_run(compose_config([f"run={digits_run}", "policy=max_prob", "thresholds=[0.9]",
                               f"out={out}", "threads=1"], config_name="export"))
    return out


def edited_export(exported: Path, tmp_path: Path, segment: str) -> Path:
    """A copy of the export whose first segment is named ``segment`` in the manifest."""
    folder = tmp_path / "deploy" / "onnx"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(exported, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["pieces"][0]["segment"] = segment
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def test_runner_refuses_piece_names_that_leave_the_export_folder(exported, tmp_path):
    OnnxEarlyExitRunner(exported, threads=1)  # the export as written loads
    outside = tmp_path / "x.onnx"  # a valid model outside the folder: it would load if opened
    shutil.copyfile(exported / "segment_0.onnx", outside)
    for name in ("../../x.onnx", str(outside)):
        folder = edited_export(exported, tmp_path, name)
        assert (folder / name).resolve().is_file()  # without the check it would be opened
        with pytest.raises(ValueError, match="is not a plain file name in the export folder"):
            OnnxEarlyExitRunner(folder, threads=1)


def test_runner_refuses_a_symlink_that_leaves_the_export_folder(exported, tmp_path):
    outside = tmp_path / "x.onnx"
    shutil.copyfile(exported / "segment_0.onnx", outside)
    folder = edited_export(exported, tmp_path, "segment_0.onnx")
    (folder / "segment_0.onnx").unlink()
    (folder / "segment_0.onnx").symlink_to(outside)
    with pytest.raises(ValueError, match="leads out of the export folder") as err:
        OnnxEarlyExitRunner(folder, threads=1)
    assert "\n" not in str(err.value)
    (folder / "segment_0.onnx").unlink()  # a symlink inside the folder is fine
    shutil.copyfile(outside, folder / "real_0.onnx")
    (folder / "segment_0.onnx").symlink_to("real_0.onnx")
    OnnxEarlyExitRunner(folder, threads=1)


# ---- the export writes no file through a symlink the run folder planted -------------------------

def test_export_into_a_planted_symlink_is_refused_or_replaced(digits_run, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "onnx_runner.py").write_text("a file of the user's\n")
    before = snapshot(victim)
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "onnx").symlink_to(victim)  # default out=RUN/onnx would write into victim/
    cfg = compose_config([f"run={run}", "policy=max_prob", "thresholds=[0.9]", "threads=1"],
                         config_name="export")
    with pytest.raises(SystemExit):
        run_job(export_run, cfg)
    assert_one_error_line(capsys.readouterr().err, "onnx is a symlink", "out=DIR")
    assert snapshot(victim) == before
    # an output folder holding files (here symlinks where the export's files go) is refused,
    # and with overwrite=true they are replaced, not written through
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "onnx_runner.py").symlink_to(victim / "onnx_runner.py")
    (out / "segment_0.onnx").symlink_to(victim / "onnx_runner.py")
    planted = snapshot(out)
    args = [f"run={digits_run}", "policy=max_prob", "thresholds=[0.9]", f"out={out}", "threads=1"]
    with pytest.raises(SystemExit):
        run_job(export_run, compose_config(args, config_name="export"))
    assert_one_error_line(capsys.readouterr().err, f"{out} is not empty", "overwrite=true")
    assert snapshot(out) == planted and snapshot(victim) == before
    export_run(compose_config(args + ["overwrite=true"], config_name="export"))
    assert snapshot(victim) == before
    assert not (out / "onnx_runner.py").is_symlink() and not (out / "segment_0.onnx").is_symlink()
