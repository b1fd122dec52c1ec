"""``experiments/cifar10_recipe/report.py`` reads finished recipe runs back as data: the last
row of a repeated epoch (a resumed run), every finished evaluation, one line for a run still
being trained."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "cifar10_recipe" / "report.py"
spec = importlib.util.spec_from_file_location("recipe_report", SCRIPT)
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def fake_run(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "seed": 3, "threads": 1, "backbone": {"name": "resnet20"},
        "loss": {"_target_": "eenet.losses.MultiExitCE", "label_smoothing": 0.1},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.2},
        "optimizer": {"lr": 0.05, "weight_decay": 0.0005},
        "dataset": {"datamodule": {"batch_size": 256, "augment": ["crop", "hflip"]}}, **config}))
    (folder / "results.json").write_text(json.dumps({
        "test": {"accuracy": 0.81}, "val": {"accuracy": 0.8}, "epochs": 3,
        "exits": [{"test_accuracy": 0.7, "cost_fraction": 0.4},
                  {"test_accuracy": 0.82, "val_accuracy": 0.83, "cost_fraction": 1.0}],
        "train_epoch_seconds": [10.0, 30.0, 20.0], "wall_s": 70.0,
        "training_segments": [{"cpu": "cpu a", "cpu_count": 2, "device": "cpu"},
                              {"cpu": "cpu b", "cpu_count": 4, "device": "cpu"}]}))
    (folder / "csv").mkdir()
    rows = ["epoch,step,val/acc,train/loss", "0,10,0.5,", "1,20,0.6,", "1,25,,2.0",
            "2,30,0.65,", "1,20,0.62,", "2,30,0.7,"]  # epochs 1 and 2 ran again after a resume
    (folder / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    for name, acc, done in (("tol", 0.79, True), ("killed", 0.1, False)):
        ev = folder / "eval" / name
        ev.mkdir(parents=True)
        (ev / "results.json").write_text(json.dumps({
            "policy": {"name": "max_prob", "thresholds": [0.9]},
            "target": {"kind": "tolerance", "value": 1.0, "min_accuracy": 0.8},
            "val": {"accuracy": 0.795, "avg_cost_fraction": 0.6},
            "test": {"accuracy": acc, "avg_cost_fraction": 0.55, "exit_rates": [0.75, 0.25]},
            "engine": {"speedup": 1.5},
            "calibration": {"test_curve": [{"avg_cost": 0.3, "accuracy": 0.5},
                                           {"avg_cost": 0.45, "accuracy": 0.6},
                                           {"avg_cost": 0.4, "accuracy": 0.55},
                                           {"avg_cost": 0.46, "accuracy": 0.78}]}}))
        if not done:
            (ev / "INCOMPLETE").write_text("")
    return folder


def test_a_run_is_read_with_the_resumed_epochs_and_finished_evaluations(tmp_path):
    r = report.read_run(fake_run(tmp_path / "run"))
    assert r["val_accuracy_per_epoch"] == {0: 0.5, 1: 0.62, 2: 0.7}
    assert (r["seed"], r["threads"], r["loss"], r["exits"]) == (3, 1, "MultiExitCE", 2)
    assert (r["train_epoch_s_median"], r["train_s"]) == (20.0, 60.0)
    # the final exit alone, and the run's own policy apart
    assert (r["test_accuracy"], r["val_accuracy"], r["test_accuracy_run_policy"]) == (0.82, 0.83, 0.81)
    assert [e["folder"].rsplit("/", 1)[-1] for e in r["evaluations"]] == ["tol"]  # not the killed
    e = r["evaluations"][0]
    assert e["chosen_by"] == {"kind": "tolerance", "value": 1.0, "min_accuracy": 0.8}
    assert (e["test_accuracy"], e["test_cost"], e["dynamic_speedup"]) == (0.79, 0.55, 1.5)
    text = report.table([r])
    # epoch seconds beside the threads and the machines the run trained on (runs of 1 and 2
    # threads sit together; this one was resumed on another machine)
    assert r["trained_on"] == "cpu a (2 cores) + cpu b (4 cores)"
    assert "| 83.00 | 82.00 | 20, 1, cpu a (2 cores) + cpu b (4 cores) | 1 |" in text
    assert "tolerance 1.0" in text and "75.0 / 25.0" in text
    # the best test point at cost <= 0.45 (0.45 itself in, 0.46 out), shown as a bound
    assert e["best_test_accuracy_within_cost_target"] == 0.6
    assert "75.0 / 25.0 | 60.00 |" in text and "a bound, not a result" in text
    assert report.best_on_test_within([{"avg_cost": 0.5, "accuracy": 0.9}], 0.45) is None
    # a config without scheduler.interval stepped per epoch (the runs before it existed)
    assert (r["schedule"], r["ema_decay"]) == ("OneCycleLR per epoch", None)
    assert "| OneCycleLR per epoch, no EMA | 256, 0.2, 0.0005, crop+hflip, 32-true |" in text
    assert r["precision"] == "32-true"  # no trainer.precision: from before it, float32
    assert (r["batch_size"], r["peak_lr"], r["augment"]) == (256, 0.2, ["crop", "hflip"])


def test_the_schedule_and_the_moving_average_are_read_from_the_config(tmp_path):
    r = report.read_run(fake_run(tmp_path / "run", ema={"decay": 0.998}, scheduler={
        "_target_": "torch.optim.lr_scheduler.OneCycleLR", "interval": "step"}))
    assert (r["schedule"], r["ema_decay"]) == ("OneCycleLR per step", 0.998)
    assert "| OneCycleLR per step, EMA 0.998 |" in report.table([r])
    # without one-cycle the peak rate is the optimizer's; augmentations as the config lists them
    r = report.read_run(fake_run(tmp_path / "cosine", scheduler={"_target_": "CosineAnnealingLR"},
                                 dataset={"datamodule": {"batch_size": 128,
                                                         "augment": ["crop", "hflip", "cutout"]}}))
    assert (r["batch_size"], r["peak_lr"], r["augment"]) == (128, 0.05, ["crop", "hflip", "cutout"])
    assert "| 128, 0.05, 0.0005, crop+hflip+cutout, 32-true |" in report.table([r])
    # the weight decay as the config gives it; "-" where it gives none
    r = report.read_run(fake_run(tmp_path / "wd", optimizer={"lr": 0.05, "weight_decay": 1e-4}))
    assert r["weight_decay"] == 1e-4 and "| 256, 0.2, 0.0001, crop+hflip," in report.table([r])
    r = report.read_run(fake_run(tmp_path / "no_wd", optimizer={"lr": 0.05}))
    assert r["weight_decay"] is None and "| 256, 0.2, -, crop+hflip," in report.table([r])


def test_where_val_left_during_training_is_read_per_epoch_and_summarised(tmp_path):
    """A three-exit run's own policy sent val to the final exit for epochs 0-1, to exit 0 for
    2-3 (a resumed epoch 3 rewritten), then exit 1; the closing evaluation logged as epoch 6
    (the run trained 6 epochs, 0-5) is not a training epoch. A run with one exit has none."""
    run = fake_run(tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results["epochs"] = 6
    results["test"].update(avg_cost_fraction=0.42, exit_rates=[0.5, 0.3, 0.2])
    (run / "results.json").write_text(json.dumps(results))
    head = "epoch,step,val/acc,val/exit0/rate,val/exit2/rate,val/exit1/rate,train/loss"
    rows = [head, "0,1,0.2,0.0,1.0,0.0,", "1,2,0.3,0.1,0.9,0.0,", "2,3,0.4,0.8,0.1,0.1,",
            "3,4,0.4,0.2,0.1,0.7,", "3,4,0.45,0.6,0.1,0.3,",  # epoch 3 again after a resume
            "3,5,,,,,1.5", "4,6,0.5,0.3,0.1,0.6,", "5,7,0.5,0.2,0.1,0.7,", "6,7,0.5,0.2,0.1,0.7,"]
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    r = report.read_run(run)
    # columns in exit order whatever their order in the file
    assert r["val_exit_rates_per_epoch"][1] == [0.1, 0.0, 0.9]
    assert r["val_exit_rates_per_epoch"][3] == [0.6, 0.3, 0.1]
    assert sorted(r["val_exit_rates_per_epoch"]) == [0, 1, 2, 3, 4, 5]
    assert r["val_dominant_exit"] == [
        {"epochs": [0, 1], "exit": 2, "share": [0.9, 1.0]},
        {"epochs": [2, 3], "exit": 0, "share": [0.6, 0.8]},
        {"epochs": [4, 5], "exit": 1, "share": [0.6, 0.7]}]
    assert (r["test_cost_run_policy"], r["test_exit_rates_run_policy"]) == (0.42, [0.5, 0.3, 0.2])
    text = report.table([r])
    assert "| run | 81.00 / 0.420 | 0-1: exit 2 (90-100 %); 2-3: exit 0 (60-80 %); " \
           "4-5: exit 1 (60-70 %) |" in text
    one = fake_run(tmp_path / "one")
    (one / "csv" / "metrics.csv").write_text("epoch,step,val/acc,val/exit0/rate\n0,1,0.5,1.0\n")
    r1 = report.read_run(one)
    assert (r1["val_exit_rates_per_epoch"], r1["val_dominant_exit"]) == ({}, [])
    assert "where val left" not in report.table([r1])


@pytest.mark.parametrize("damage,message", [
    ("incomplete", "is still being trained (INCOMPLETE is there)"),
    ("no results", "has no results.json: not a finished eenet-train run"),
    ("missing", "is not a folder")])
def test_unfinished_or_missing_runs_are_one_line(tmp_path, capsys, damage, message):
    run = fake_run(tmp_path / "run")
    if damage == "incomplete":
        (run / "INCOMPLETE").write_text("")
    elif damage == "no results":
        (run / "results.json").unlink()
    else:
        run = tmp_path / "elsewhere"
    saved = {p: p.stat().st_mtime_ns for p in SCRIPT.parent.glob("report*.json")}
    with pytest.raises(SystemExit) as exit_:
        report.main([str(run)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run} {message}"
    assert {p: p.stat().st_mtime_ns for p in SCRIPT.parent.glob("report*.json")} == saved
