"""The CIFAR-10 (JPEG) rows of the paper tables (experiments/tables.py, issue 20).

Without ``--cifar10 yes`` (and outside SMOKE) nothing trains for them: every row says
"not run" and carries the command that would make it, and no number. The SMOKE runs of
whole tables, CIFAR-10 rows included, are in tests/test_tables.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eenet.config import compose_config

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "tables.py"

#: the recipe's epochs (conf/experiment/cifar10_recipe/_recipe.yaml), as the rows carry them
EPOCHS = int(compose_config(["experiment=cifar10_recipe/resnet20"],
                            output_dir="unused").trainer.max_epochs)


def _tables():
    spec = importlib.util.spec_from_file_location("experiment_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _tables()


def _numbers_free(cells: list[str]) -> bool:
    return all(c == tables.NOT_RUN or not re.search(r"\d", c) for c in cells)


def _cifar_md_rows(markdown: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| cifar10_jpeg") or line.startswith("| resnet8 / CIFAR")]
    assert rows
    return rows


def test_eenets_cifar_rows_not_run_say_so_with_their_commands(tmp_path):
    t = tables.Table("eenets", tmp_path, tmp_path / "data", smoke=False, seeds=[0, 1],
                     cifar10=False)
    md, rows, deviations = tables.table_eenets(t, datasets=[])  # no MNIST: nothing trains
    assert not any((tmp_path / "runs").rglob("results.json"))
    assert {r["model"] for r in rows} == {"resnet20 (no exits)", "resnet20 + 6 EENets exits"}
    assert all(r["status"] == tables.NOT_RUN and r["job"] is None for r in rows)
    assert not any(k in r for r in rows for k in ("accuracy", "cost", "rates"))
    assert [r["lambda"] for r in rows if r["model"] != "resnet20 (no exits)"] == [
        "0.25", "0.5", "1", "2"]
    # the recipe's epochs and the seeds asked for, as plans: the row's own fields stay empty
    assert all(r["planned_epochs"] == EPOCHS and r["planned_seeds"] == [0, 1] for r in rows)
    assert all(r["epochs"] is None and r["seed"] is None and r["wall_s"] is None for r in rows)
    plain = next(r["command"] for r in rows if r["model"] == "resnet20 (no exits)")
    assert plain.startswith("eenet-train -m ") and "experiment=cifar10_recipe/resnet20 " in plain
    assert "seed=0,1" in plain and plain.endswith(f"cifar10_jpeg_recipe_resnet20_{EPOCHS}ep")
    for row in _cifar_md_rows(md):  # data set, model, lambda, then every other cell
        assert "not run" in row and _numbers_free(row[3:-1]), row
    assert any("JPEG" in d for d in deviations)


def test_cifar10_epochs_reach_the_commands_and_the_rows(tmp_path):
    t = tables.Table("eenets", tmp_path, tmp_path / "data", smoke=False, seeds=[0],
                     cifar10=False, cifar10_epochs=15)
    _, rows, _ = tables.table_eenets(t, datasets=[])
    assert all(r["planned_epochs"] == 15 and "trainer.max_epochs=15" in r["command"] for r in rows)
    # a budget of its own gets folders of its own (a finished run folder is never written into)
    assert all(re.search(r"hydra.sweep.dir=\S+_15ep$", r["command"]) for r in rows)


def test_not_run_rows_pass_through_the_table_files(tmp_path):
    """The eenets table through ``build`` with only its CIFAR rows (no MNIST data set): its
    markdown and JSON say which rows did not run and list the commands that make them."""
    args = type("Args", (), {"out": str(tmp_path), "data": str(tmp_path / "data"), "smoke": False,
                             "seeds": [0], "cifar10": "no", "cifar10_epochs": None,
                             "datasets": [], "backbones": []})()
    md_path = tables.build("eenets", args)
    text = md_path.read_text()
    data = json.loads((tmp_path / "eenets.json").read_text())
    assert "rows not run" in text and "experiment=cifar10_recipe/resnet20_eenets" in text
    assert all(r["status"] == tables.NOT_RUN and r["command"].startswith("eenet-train -m ")
               for r in data["rows"])
    assert data["sweeps"] and all(s.get(tables.NOT_RUN) for s in data["sweeps"])


@pytest.mark.slow
def test_smoke_trecx_without_cifar_rows_runs_the_rest(tmp_path, data_root):
    env = {**os.environ, "WANDB_MODE": "disabled", "SMOKE": "1", "CIFAR10": "0"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "trecx", "--out", str(tmp_path), "--data",
                           str(data_root.path)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "trecx.json").read_text())
    cifar = [r for r in data["rows"] if r["setting"].startswith("resnet8 / CIFAR")]
    others = [r for r in data["rows"] if not r["setting"].startswith("resnet8 / CIFAR")]
    assert {r["model"] for r in cifar} == {"no exits", "T-RecX", "T-RecX + mitigation"}
    assert all(r["status"] == tables.NOT_RUN and "accuracy" not in r for r in cifar)
    assert others and all("status" not in r and r["machine"] != "not recorded" for r in others)
    for row in _cifar_md_rows(data["markdown"]):
        assert _numbers_free(row[2:-1]), row
