"""eenet installs like a library: its wheel holds every config, and the installed package
trains and evaluates from an empty folder outside the checkout, with a user's own config group.

The wheel is built by pip from a copy of the checkout's package files (no network, no
build isolation: the running interpreter's setuptools), then unpacked, which is how a
pure-Python wheel installs, into a fresh virtual environment. That environment sees one
other folder: this interpreter's site-packages, for torch, Lightning and Hydra, added as a
path (its ``.pth`` files, among them the editable install of the checkout, are not run).
Commands run there from an empty working folder, so the checkout cannot be imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# what the wheel is built from: the package and the files setuptools reads
BUILD_FILES = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in")
# a tiny digits run: 256 training and 128 test images, one epoch
TINY = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
        "checkpoint.enabled=false", "anytime=false", "dataset.datamodule.train_subset=256",
        "dataset.datamodule.test_subset=128"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> dict:
    """``pip wheel`` of the checkout (its path and the build's log), built in a copy so no
    ``build/`` folder lands in the checkout."""
    root = tmp_path_factory.mktemp("build")
    src = root / "src"
    shutil.copytree(REPO / "eenet", src / "eenet",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in BUILD_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                           "--no-build-isolation", "--disable-pip-version-check", "-v",
                           "-w", str(root / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = (root / "dist").glob("eenet-*.whl")
    return {"path": built, "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel unpacked into its site-packages."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    prefix = {"base": str(env_dir), "platbase": str(env_dir)}
    site = Path(sysconfig.get_paths(vars=prefix)["purelib"])
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel["path"]) as zf:
        assert not [n for n in zf.namelist() if ".data/" in n]  # nothing beyond site-packages
        zf.extractall(site)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "HYDRA_FULL_ERROR", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return {"python": str(env_dir / "bin" / "python"), "site": site, "env": env}


def _run(installed: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([installed["python"], *args], cwd=cwd, env=installed["env"],
                          capture_output=True, text=True, timeout=600)


def _user_conf(root: Path) -> Path:
    """A user's folder with ``backbone/my_resnet.yaml``: eenet's resnet20 at half width."""
    folder = root / "my_conf"
    (folder / "backbone").mkdir(parents=True)
    resnet20 = (REPO / "eenet" / "conf" / "backbone" / "resnet20.yaml").read_text()
    (folder / "backbone" / "my_resnet.yaml").write_text(resnet20 + "widths: [8, 16, 32]\n")
    return folder


def test_wheel_holds_every_config_and_module(wheel):
    # setuptools' warning that a folder (a config group) is left out of the packages
    assert "would be ignored" not in wheel["log"]
    with zipfile.ZipFile(wheel["path"]) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    package = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "eenet").rglob("*"))
               if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    assert any(p.startswith("eenet/conf/") and p.endswith(".yaml") for p in package)
    assert [p for p in package if p not in names] == []
    for script in ("eenet-train = eenet.cli.train:main", "eenet-eval = eenet.cli.eval:main",
                   "eenet-export = eenet.cli.export:main"):
        assert script in entry_points.decode()


def test_installed_eenet_trains_and_evaluates_from_an_empty_folder(installed, tmp_path):
    user = _user_conf(tmp_path)
    work = tmp_path / "work"
    work.mkdir()

    proc = _run(installed, work, "-c", "import eenet, sys; print(eenet.__file__); "
                                       "print('\\n'.join(sys.path))")
    assert proc.returncode == 0, proc.stderr
    where, *path = proc.stdout.splitlines()
    assert Path(where).is_relative_to(installed["site"]), where
    assert not [p for p in path if p and Path(p).resolve() in (REPO, REPO / "eenet")]

    proc = _run(installed, work, "-m", "eenet.cli.train", "--config-dir", str(user),
                "backbone=my_resnet", *TINY, "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = work / "run"
    assert (run / "results.json").is_file() and (run / "model.pt").is_file()
    # the user's group was used: its widths are in the run's config and in the weights
    assert yaml.safe_load((run / "config.yaml").read_text())["backbone"]["widths"] == [8, 16, 32]
    state = torch.load(run / "model.pt", weights_only=True)
    assert state["backbone.stem.0.weight"].shape[0] == 8

    proc = _run(installed, work, "-m", "eenet.cli.eval", "run=run", "tolerance=1",
                "hydra.run.dir=run/eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "eval" / "results.json").is_file()
    assert sorted(os.listdir(work)) == ["run"]  # nothing else written in the working folder


def test_installed_eenet_refuses_an_unknown_option_in_one_line(installed, tmp_path):
    user = _user_conf(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    proc = _run(installed, work, "-m", "eenet.cli.train", "--config-dir", str(user),
                "backbone=resnet21")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown backbone 'resnet21'; accepted:")
    assert "my_resnet" in lines[0] and "resnet20" in lines[0]  # the user's options and eenet's
    assert os.listdir(work) == []
