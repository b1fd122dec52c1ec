"""``experiments/tables.py --adopt KEY=RUN``: a run trained by hand stands for a sweep's job.

One SMOKE run pair is trained by hand (``eenet-train -m seed=0,1`` with the table's SMOKE
overrides, on the recipe of the CIFAR-10 (JPEG) resnet20 row) and adopted by the eenets table,
which is limited to its CIFAR-10 rows (``table_eenets`` called with no MNIST data set: nothing
else trains) so that the test stays short; everything else (main, the checks, the first pass,
the rows, the files) is the script's own. Every refusal is one line through ``main()`` and
leaves no table file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eenet.config import compose_config
from eenet.reporting.experiment import machine_info

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "tables.py"
#: the recipe's epochs (conf/experiment/cifar10_recipe/_recipe.yaml), as the rows' keys carry them
EPOCHS = int(compose_config(["experiment=cifar10_recipe/resnet20"],
                            output_dir="unused").trainer.max_epochs)
KEY = f"cifar10_jpeg_recipe_resnet20_{EPOCHS}ep"  # the plain resnet20's row, as "not run: KEY" names it


def _tables():
    spec = importlib.util.spec_from_file_location("experiment_tables_adopt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _tables()


@pytest.fixture(scope="module")
def hand_runs(tmp_path_factory, data_root) -> dict[int, Path]:
    """Two finished runs of the row's recipe (seeds 0 and 1), trained outside the table."""
    folder = tmp_path_factory.mktemp("hand") / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "eenet.cli.train", "-m", "experiment=cifar10_recipe/resnet20",
         f"data_root={data_root.path}", "threads=1", *tables.SMOKE, "seed=0,1",
         f"hydra.sweep.dir={folder}"],
        env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {json.loads((job / "results.json").read_text())["config"]["seed"]: job
            for job in folder.iterdir() if (job / "results.json").is_file()}
    assert sorted(runs) == [0, 1]
    return runs


@pytest.fixture
def cifar_only(monkeypatch):
    """The eenets table without its MNIST rows (they would train for minutes)."""
    original = tables.table_eenets
    monkeypatch.setattr(tables, "table_eenets", lambda t, datasets: original(t, []))


def _main(out: Path, data: Path, *extra: str) -> None:
    tables.main(["eenets", "--smoke", "--cifar10", "no", "--out", str(out), "--data", str(data),
                 *extra])


def _refused(capsys, out: Path, data: Path, *extra: str) -> str:
    """main() with ``extra`` exits 2 with one line; nothing is written into ``out``."""
    with pytest.raises(SystemExit) as exc:
        _main(out, data, *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --adopt"), err
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    return err


def test_adopted_runs_give_rows_and_the_table_says_so(tmp_path, data_root, hand_runs, cifar_only):
    # the table's data folder under another name: the data set's folder is compared below it
    data = tmp_path / "data_link"
    data.symlink_to(data_root.path, target_is_directory=True)
    (hand_runs[1] / "machine.json").write_text(json.dumps({"cpu": "hand cpu", "cpu_count": 3}))
    try:
        _main(tmp_path / "out", data, "--seeds", "0", "1",
              "--adopt", f"{KEY}={hand_runs[0]}", f"{KEY}={hand_runs[1]}")
    finally:
        (hand_runs[1] / "machine.json").unlink()
    md = (tmp_path / "out" / "eenets.md").read_text()
    table = json.loads((tmp_path / "out" / "eenets.json").read_text())
    plain = [r for r in table["rows"] if r["model"] == "resnet20 (no exits)"]
    assert len(plain) == 2 and all(r.get("status") != tables.NOT_RUN for r in plain)
    for r in plain:  # the run's own numbers, seed, threads and command
        res = json.loads((Path(r["job"]) / "results.json").read_text())
        assert Path(r["job"]) == hand_runs[r["seed"]] and r["adopted"] is True
        assert r["accuracy"] == res["test"]["accuracy"] and r["threads"] == 1
        assert r["command"] == f"adopted run {r['job']} (its config.yaml: {r['job']}/config.yaml)"
    # the recipe's trainer.precision=auto chose per machine; a mixed precision is named
    chosen = {seed: OmegaConf.load(job / "config.yaml").trainer.precision
              for seed, job in hand_runs.items()}
    trained_in = {seed: "" if p == "32-true" else f", trained in {p}" for seed, p in chosen.items()}
    # each run records the machine that trained it (results.json's training_segments): that
    # comes before a machine.json written beside it
    here = f"{machine_info()['cpu']} ({machine_info()['cpu_count']} cores)"
    assert {r["seed"]: r["machine"] for r in plain} == {
        0: here + trained_in[0], 1: here + trained_in[1]}
    assert {r["seed"]: r["precision"] for r in plain} == chosen
    # the rows not adopted stay "not run", with the sweep's command
    ee = [r for r in table["rows"] if r["model"] != "resnet20 (no exits)"]
    assert ee and all(r["status"] == tables.NOT_RUN and "adopted" not in r for r in ee)
    adopted = [s for s in table["sweeps"] if s.get("adopted")]
    assert [(s["key"], s["seed"], s["adopted"]) for s in adopted] == [
        (KEY, seed, str(hand_runs[seed])) for seed in (0, 1)]
    for s in adopted:  # the run's own command; the sweep's, for the record, never as run
        assert s["command"] == next(r["command"] for r in plain if r["seed"] == s["seed"])
        assert s["sweep_command"].startswith("eenet-train -m ") and "seed=0,1" in s["sweep_command"]
        assert s["sweep_command"] not in md
    assert "Adopted runs" in md
    for s in (0, 1):
        assert f"- {KEY} -> {hand_runs[s]} (seed {s}, threads 1)" in md
    row = next(line for line in md.splitlines() if "resnet20 (no exits)" in line)
    assert tables.NOT_RUN not in row and "| 2 |" in row  # two seeds, with numbers
    assert not (tmp_path / "out" / "runs").exists()  # nothing was trained for it


def test_a_sweep_adopted_in_part_shows_its_other_jobs_not_run(tmp_path, data_root, cifar_only):
    """One lambda of the EENets sweep trained by hand: its row, and the other lambda's row
    "not run" with the sweep's command (before, the other lambdas' rows were left out)."""
    run = tmp_path / "eenets_l0.5"
    proc = subprocess.run(
        [sys.executable, "-m", "eenet.cli.train", "experiment=cifar10_recipe/resnet20_eenets",
         "loss.second.lambda_coef=0.5", f"data_root={data_root.path}", "threads=1",
         *tables.SMOKE, "seed=0", f"hydra.run.dir={run}"],
        env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _main(tmp_path / "out", data_root.path, "--seeds", "0", "--adopt",
          f"cifar10_jpeg_recipe_resnet20_eenets_{EPOCHS}ep={run}")
    table = json.loads((tmp_path / "out" / "eenets.json").read_text())
    ee = {str(r["lambda"]): r for r in table["rows"] if r["model"] == "resnet20 + 6 EENets exits"}
    assert sorted(ee) == ["0.5", "1"]  # the SMOKE sweep's lambdas
    assert ee["0.5"]["job"] == str(run) and ee["0.5"].get("status") != tables.NOT_RUN
    assert ee["1"]["status"] == tables.NOT_RUN and ee["1"]["job"] is None
    assert "loss.second.lambda_coef=0.5,1" in ee["1"]["command"]
    assert tables.lambdas_not_run([{"lambda": "-"}], ["-"]) == []
    assert tables.lambdas_not_run([], ["-"]) == ["-"]


def test_adopt_refusals_are_one_line_and_write_nothing(tmp_path, data_root, hand_runs,
                                                      cifar_only, capsys):
    out, data = tmp_path / "out", data_root.path
    run = tmp_path / "copy"
    shutil.copytree(hand_runs[0], run)
    err = _refused(capsys, out, data, "--adopt", f"{KEY}={tmp_path / 'missing'}")
    assert "no such folder" in err
    (run / tables.MARKER).write_text("eenet-train started writing this folder\n")
    assert "not a finished run" in _refused(capsys, out, data, "--adopt", f"{KEY}={run}")
    (run / tables.MARKER).unlink()
    (run / "results.json").rename(run / "results.json.away")
    assert "no results.json" in _refused(capsys, out, data, "--adopt", f"{KEY}={run}")
    (run / "results.json.away").rename(run / "results.json")
    err = _refused(capsys, out, data, "--adopt", f"nonsense={run}")
    assert "no sweep 'nonsense'" in err and f"accepted keys: {KEY}, " in err
    assert f"cifar10_jpeg_recipe_resnet20_eenets_{EPOCHS}ep" in err
    err = _refused(capsys, out, data, "--seeds", "1", "--adopt", f"{KEY}={run}")
    assert "seed 0 is not one of --seeds 1" in err
    err = _refused(capsys, out, data, "--adopt", f"{KEY}={run}", f"{KEY}={hand_runs[0]}")
    assert "the same job (seed 0)" in err
    # a key that defines the trained model: named, with both values
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.loss.label_smoothing = 0.2
    OmegaConf.save(cfg, run / "config.yaml")
    err = _refused(capsys, out, data, "--adopt", f"{KEY}={run}")
    assert "loss.label_smoothing is 0.1 in the sweep, 0.2 in the run (1 key(s) differ" in err
    # where-and-how keys may differ: the same copy with its label smoothing back is accepted
    # by the first pass (it trains and writes nothing)
    cfg.loss.label_smoothing = 0.1
    cfg.threads, cfg.trainer.enable_progress_bar = 2, True
    OmegaConf.save(cfg, run / "config.yaml")
    args = type("Args", (), {"out": str(out), "data": str(data), "smoke": True, "seeds": [0],
                             "cifar10": "no", "cifar10_epochs": None, "datasets": ["mnist"],
                             "backbones": ["resnet20"]})()
    tables.plan_adopted(("eenets",), args, tables.read_adopted([f"{KEY}={run}"]))
    assert not out.exists()


def test_a_row_names_the_precision_its_run_trained_in(tmp_path):
    """A config from before trainer.precision trained in float32: no mention; a mixed precision
    is named in the machine cell (an adopted run may differ from the sweep there)."""
    (tmp_path / "machine.json").write_text(json.dumps({"cpu": "cpu x", "cpu_count": 2}))
    res = {"config": {"seed": 0, "threads": 1, "trainer": {}}, "epochs": 3, "wall_s": 1.0}
    old = tables.row_facts(res, tmp_path)
    assert (old["precision"], old["machine"]) == ("32-true", "cpu x (2 cores)")
    res["config"]["trainer"]["precision"] = "bf16-mixed"
    new = tables.row_facts(res, tmp_path)
    assert (new["precision"], new["machine"]) == ("bf16-mixed", "cpu x (2 cores), trained in bf16-mixed")
    assert "trainer.precision" in tables.ADOPT_MAY_DIFFER


def test_a_row_names_the_machines_that_trained_its_run(tmp_path):
    """The run's own record (every process that trained it, each machine once, a GPU named),
    else machine.json beside it, else "not recorded"."""
    (tmp_path / "results.json").write_text(json.dumps({"epochs": 3}))
    assert tables.machine_of(tmp_path) == "not recorded"
    (tmp_path / "machine.json").write_text(json.dumps({"cpu": "cpu x", "cpu_count": 2}))
    assert tables.machine_of(tmp_path) == "cpu x (2 cores)"
    a = {"cpu": "cpu a", "cpu_count": 2, "device": "cpu"}
    b = {"cpu": "cpu b", "cpu_count": 8, "device": "cuda (gpu z)"}
    (tmp_path / "results.json").write_text(json.dumps({"training_segments": [a, b, a]}))
    assert tables.machine_of(tmp_path) == "cpu a (2 cores) + cpu b (8 cores), cuda (gpu z)"


def test_the_data_folder_is_one_path_however_it_is_spelled(tmp_path, monkeypatch):
    """``make table-*`` passes ``--data ../shared/data``, the script's default is absolute: both
    name one folder, so both must give the sweeps the same command (a sweep that already ran is
    found again only by its command); a symlink keeps its own name."""
    import argparse

    (tmp_path / "repo").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "shared" / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "repo")

    def data_of(spelled: str) -> Path:
        args = argparse.Namespace(data=spelled, out=str(tmp_path / "out"), smoke=False, seeds=[0],
                                  cifar10="no", cifar10_epochs=None)
        return tables.make_table("baselines", args).data

    assert data_of("../shared/data") == data_of(str(tmp_path / "shared" / "data")) \
        == tmp_path / "shared" / "data"
    assert data_of("../link") == tmp_path / "link"
