"""A resumed run keeps its CSV history (eenet.reporting.csv_log.RunCSVLogger).

Lightning's CSV writer deletes an existing ``metrics.csv``; eenet's run folder logger
appends to it when the run is resumed, and starts a new file otherwise.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eenet.config import ALLOWED_TARGETS, check_targets, compose_config, instantiate
from eenet.errors import EENetError
from eenet.jobs.train import train
from eenet.reporting.csv_log import RunCSVLogger

RECIPE = ["dataset.datamodule.train_subset=200", "logger=csv", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "anytime=false", "threads=1",
          "trainer.accelerator=cpu"]


def _rows(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _train_epochs(rows: list[dict[str, str]]) -> list[int]:
    """The epochs of the rows that the training loop logged (train/loss is set only there;
    the val / test rows after fit carry the trainer's final epoch, trained or not)."""
    return [int(r["epoch"]) for r in rows if r.get("train/loss")]


def test_a_resumed_run_appends_to_its_metrics_csv(tmp_path):
    run = tmp_path / "run"
    train(compose_config(RECIPE + ["trainer.max_epochs=1"], output_dir=run))
    header1, rows1 = _rows(run)
    assert _train_epochs(rows1) == [0]

    train(compose_config(RECIPE + ["trainer.max_epochs=2", "resume=true"], output_dir=run))
    header2, rows2 = _rows(run)
    assert _train_epochs(rows2) == [0, 1]  # Lightning's own writer leaves [1]
    # the first attempt's rows come first, unchanged (the header here gained no column)
    assert header2 == header1
    assert rows2[:len(rows1)] == rows1
    assert len(rows2) > len(rows1)
    # the saved config names the logger, and a run folder's config may name it
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.logger.csv._target_ == "eenet.reporting.csv_log.RunCSVLogger"
    assert saved.logger.csv.append is True
    check_targets(saved, "config.yaml")

    # overwrite=true: a new run, whose file holds none of the replaced run's rows
    train(compose_config(RECIPE + ["trainer.max_epochs=1", "overwrite=true", "seed=1"],
                         output_dir=run))
    _, rows3 = _rows(run)
    assert _train_epochs(rows3) == [0]
    assert len(rows3) == len(rows1)
    assert rows3[0]["val/loss"] != rows1[0]["val/loss"]  # another seed: another run's numbers


def _stale_file(log_dir: Path) -> None:
    log_dir.mkdir(parents=True)
    (log_dir / "metrics.csv").write_text("a,step\n1.0,0\n2.0,1\n")


def test_append_keeps_the_rows_and_extends_the_header(tmp_path):
    _stale_file(tmp_path / "csv")
    logger = RunCSVLogger(str(tmp_path), name="csv", version="", append=True)
    logger.log_metrics({"a": 3.0, "b": 4.0}, step=2)
    logger.save()
    header, rows = _rows(tmp_path)
    assert header == ["a", "b", "step"]
    assert rows == [{"a": "1.0", "b": "", "step": "0"}, {"a": "2.0", "b": "", "step": "1"},
                    {"a": "3.0", "b": "4.0", "step": "2"}]


def test_append_under_the_same_header_adds_rows_only(tmp_path):
    _stale_file(tmp_path / "csv")
    logger = RunCSVLogger(str(tmp_path), name="csv", version="", append=True)
    logger.log_metrics({"a": 3.0}, step=2)
    logger.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == [
        "a,step", "1.0,0", "2.0,1", "3.0,2"]


def test_without_append_a_new_file_is_started(tmp_path):
    _stale_file(tmp_path / "csv")
    logger = RunCSVLogger(str(tmp_path), name="csv", version="")
    logger.log_metrics({"b": 5.0}, step=0)
    logger.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == ["b,step", "5.0,0"]


def test_append_without_a_file_writes_a_new_one(tmp_path):
    logger = RunCSVLogger(str(tmp_path), name="csv", version="", append=True)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == ["a,step", "1.0,0"]


def test_the_config_follows_resume_and_refuses_a_non_boolean(tmp_path):
    for resume in (False, True):
        cfg = compose_config([f"resume={str(resume).lower()}"], output_dir=tmp_path)
        assert instantiate(cfg.logger.csv, "logger")._append is resume
    cfg = compose_config(["logger.csv.append=yes"], output_dir=tmp_path)
    with pytest.raises(EENetError, match=r"^logger.csv.append='yes' must be true or false$"):
        instantiate(cfg.logger.csv, "logger")


def test_run_folders_made_with_lightnings_csv_logger_stay_allowed():
    assert {"lightning.pytorch.loggers.CSVLogger",
            "eenet.reporting.csv_log.RunCSVLogger"} <= ALLOWED_TARGETS
