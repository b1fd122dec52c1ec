"""eenet-eval: calibration on val, dynamic engine on test, the report files, safe loading."""

from __future__ import annotations

import json
import math
import os
import pickle
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eenet.config import compose_config
from eenet.data.batching import make_loader
from eenet.errors import EENetError
from eenet.inference import DynamicEngine
from eenet.jobs.evaluate import evaluate, report
from eenet.jobs.train import train
from eenet.policies import create_policy
from eenet.reporting.experiment import run_machine
from eenet.reporting.results import FORMAT_VERSION, PLAIN_FORMAT, RunResults
from eenet.runs import load_run

REPO = Path(__file__).resolve().parents[1]
#: the top-level keys eenet-eval wrote before typed results (commit 0b1432b): all stay
PREVIOUS_EVAL_KEYS = {"dataset", "backbone", "num_classes", "backbone_macs", "macs_convention",
                      "input_size", "exits", "policy", "test", "val", "run", "target",
                      "calibration", "engine", "drop_vs_final_exit", "config"}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    cfg = compose_config(["trainer.max_epochs=4", "trainer.enable_progress_bar=false",
                          "logger=none"], output_dir=out)
    train(cfg)
    return out


def eval_config(run, out, *overrides):
    return compose_config([f"run={run}", *overrides], output_dir=out, config_name="eval")


def test_eval_with_tolerance_writes_the_report(digits_run, tmp_path):
    out = tmp_path / "eval"
    res = evaluate(eval_config(digits_run, out, "tolerance=1.0", "batch_size=64"))
    for name in ("results.json", "results.md", "curve.png", "exits.png", "reliability.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["target"]["kind"] == "tolerance" and saved["target"]["value"] == 1.0
    cal = saved["calibration"]
    assert cal["reachable"] is True
    # 1e-12: the calibrator's own comparison slack for a target (Calibrator._best)
    assert cal["chosen"]["accuracy"] >= cal["reference_final_exit"]["accuracy"] - 0.01 - 1e-12
    assert len(saved["policy"]["thresholds"]) == 2
    assert len(cal["curve"]) > 2 and len(cal["pareto"]) >= 1 and len(cal["test_curve"]) == len(cal["curve"])
    assert res == saved and RunResults.from_dict(saved).to_dict() == saved
    assert set(saved) == PREVIOUS_EVAL_KEYS | {"format_version", "eenet_version"}
    assert saved["format_version"] == PLAIN_FORMAT  # no temperatures: format 2's layout
    assert set(saved["test"]) == {"accuracy", "avg_cost_fraction", "exit_rates", "n", "oracle_acc"}
    # test figures come from the dynamic engine, which agrees with static path + policy
    assert saved["engine"]["agreement_with_static"] == 1.0
    # and it was timed against the final exit alone on the same split (default: 3 passes)
    engine = saved["engine"]
    assert engine["timed_passes"] == 3
    assert len(engine["dynamic_pass_s"]) == len(engine["final_exit_pass_s"]) == 3
    assert engine["dynamic_wall_s"] == statistics.median(engine["dynamic_pass_s"]) > 0
    assert engine["final_exit_wall_s"] == statistics.median(engine["final_exit_pass_s"]) > 0
    assert engine["speedup"] == engine["final_exit_wall_s"] / engine["dynamic_wall_s"]
    # on this machine: a timing says where it was measured (no host name: a folder is data)
    here, m = run_machine(), engine["machine"]
    assert [m[k] for k in ("cpu", "cpu_count", "torch")] == [here[k] for k in ("cpu", "cpu_count",
                                                                             "torch")]
    assert m["torch_threads"] == engine["threads"] and "hostname" not in m
    t = saved["test"]
    assert t["n"] == 360 and sum(t["exit_rates"]) == pytest.approx(1.0)
    fr = [e["cost_fraction"] for e in saved["exits"]]
    assert t["avg_cost_fraction"] == pytest.approx(sum(r * c for r, c in zip(t["exit_rates"], fr)))
    assert res["test"]["accuracy"] == t["accuracy"]
    # the drop against the final exit, with its paired standard error, on both splits
    drops = saved["drop_vs_final_exit"]
    assert drops["val"]["drop_points"] == pytest.approx(
        100 * (cal["reference_final_exit"]["accuracy"] - cal["chosen"]["accuracy"]))
    assert drops["test"]["drop_points"] == pytest.approx(
        100 * (cal["final_exit_test"]["accuracy"] - t["accuracy"]))
    assert all(d["se_points"] >= 0 and 0 <= d["discordant"] <= 1 for d in drops.values())
    # the training run's own files are untouched
    assert json.loads((digits_run / "results.json").read_text())["dataset"] == "digits"


def test_eval_with_budget_and_latency(digits_run, tmp_path):
    res = evaluate(eval_config(digits_run, tmp_path / "b", "budget=0.3", "policy=max_prob",
                               "latency=true", "timing_passes=0"))
    assert set(res) == PREVIOUS_EVAL_KEYS | {"format_version", "eenet_version", "latency"}
    assert set(res["engine"]) == {"batch_size", "wall_s", "agreement_with_static",
                                  "machine"}  # no timing
    assert res["calibration"]["chosen"]["avg_cost"] <= 0.3
    assert set(res["latency"]) == {"exit_table"}  # a mapping, the eager table alone
    assert {r["batch_size"] for r in res["latency"]["exit_table"]} == {1, 256}
    assert "Measured latency to reach and evaluate each exit (eager):" in report(res)
    assert (tmp_path / "b" / "latency.json").is_file()


def test_unreachable_budget_is_reported(digits_run, tmp_path):
    res = evaluate(eval_config(digits_run, tmp_path / "u", "budget=0.05"))
    assert res["calibration"]["reachable"] is False
    assert "unreachable" in res["calibration"]["message"]


def test_eval_needs_exactly_one_target_and_a_run(digits_run, tmp_path):
    with pytest.raises(EENetError, match="exactly one calibration target"):
        evaluate(eval_config(digits_run, tmp_path / "x"))
    with pytest.raises(EENetError, match="not a finished eenet-train run"):
        evaluate(eval_config(tmp_path, tmp_path / "y", "tolerance=1"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(digits_run, tmp_path):
    run = tmp_path / "evil_run"
    run.mkdir()
    (run / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    marker = tmp_path / "payload_ran"
    with open(run / "model.pt", "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    with pytest.raises(EENetError, match="cannot load .* safely"):
        load_run(run)
    assert not marker.exists()
    # the same file with plain unpickling would have run the payload: the test is real
    with open(run / "model.pt", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_truncated_or_mismatching_weights_are_named(digits_run, tmp_path):
    run = tmp_path / "bad_run"
    run.mkdir()
    (run / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    data = (digits_run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EENetError, match="cannot load"):
        load_run(run)
    state = torch.load(digits_run / "model.pt", weights_only=True)
    state.pop("exits.1.confidence.bias")
    torch.save(state, run / "model.pt")
    with pytest.raises(EENetError, match="missing: exits.1.confidence.bias"):
        load_run(run)


def test_eval_cli(digits_run, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "eenet.cli.eval", f"run={digits_run}", "tolerance=2",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Calibrated on val for tolerance 2.0 points" in proc.stdout
    assert (out / "curve.png").is_file()


def test_eval_with_optimism_correction_records_it(digits_run, tmp_path):
    out = tmp_path / "eval_cv"
    evaluate(eval_config(digits_run, out, "tolerance=1.0", "optimism_folds=3",
                            "optimism_repeats=2"))
    saved = json.loads((out / "results.json").read_text())
    target = saved["calibration"]["target"]
    opt = target["optimism"]
    assert target["value"] == 1.0 and opt["folds"] == 3 and opt["repeats"] == 2
    assert len(opt["per_fold_points"]) == 6
    assert 0 <= opt["effective_tolerance"] <= 1.0
    assert target["min_accuracy"] == pytest.approx(
        target["final_exit_accuracy"] - opt["effective_tolerance"] / 100)
    assert "tightened" in saved["calibration"]["message"] or not saved["calibration"]["reachable"]


def _copy_run(src: Path, dst: Path, results: dict) -> Path:
    dst.mkdir()
    for name in ("config.yaml", "model.pt"):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "results.json").write_text(json.dumps(results))
    return dst


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_run_written_by_a_newer_eenet_is_refused_and_nothing_is_written(digits_run, tmp_path):
    saved = json.loads((digits_run / "results.json").read_text())
    newer = _copy_run(digits_run, tmp_path / "newer",
                      {**saved, "format_version": FORMAT_VERSION + 1})
    unknown = _copy_run(digits_run, tmp_path / "unknown", {**saved, "energy_joules": 3.0})
    with pytest.raises(EENetError) as err:
        load_run(newer)
    assert str(err.value) == (f"{newer} was written by a newer eenet (format {FORMAT_VERSION + 1}, "
                              f"this eenet reads up to {FORMAT_VERSION}); upgrade eenet")
    with pytest.raises(EENetError, match="keys it does not know: energy_joules"):
        evaluate(eval_config(unknown, tmp_path / "out", "tolerance=1"))
    assert not (tmp_path / "out").exists()
    # the command: one line, code 2, no traceback, the run folder exactly as it was
    before = _snapshot(newer)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "eenet.cli.eval", f"run={newer}", "tolerance=1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {err.value}"
    assert _snapshot(newer) == before and not (newer / "eval").exists()


def demo_commands() -> dict[str, list[str]]:
    """The arguments of `make demo`'s eenet-train and eenet-eval commands, from the Makefile."""
    text = (REPO / "Makefile").read_text()
    recipe = text[text.index("\ndemo:"):].split("\n\n")[0].splitlines()[1:]
    out = {}
    for line in recipe:
        words = shlex.split(line.strip())
        for tool in ("eenet-train", "eenet-eval"):
            if words and words[0].endswith("/" + tool):
                out[tool] = words[1:]
    assert set(out) == {"eenet-train", "eenet-eval"}, recipe
    return out


def test_the_demo_shows_the_trade_off_and_measures_it(tmp_path):
    """`make demo`'s own settings (all of them, 8 epochs included): samples leave at two
    or more exits on test, and the engine's time is measured against the final exit alone."""
    cmds = demo_commands()

    def keep(args):
        return [a for a in args if not a.startswith(("hydra.run.dir=", "run="))]

    threads = torch.get_num_threads()
    try:
        run = tmp_path / "demo"
        train(compose_config(keep(cmds["eenet-train"]), output_dir=run))
        res = evaluate(compose_config([f"run={run}", *keep(cmds["eenet-eval"])],
                                      output_dir=run / "eval", config_name="eval"))
    finally:
        torch.set_num_threads(threads)
    rates = res["test"]["exit_rates"]
    assert sum(r > 0 for r in rates) >= 2, rates
    assert sum(r > 0 for r in res["val"]["exit_rates"]) >= 2
    engine = res["engine"]
    assert engine["threads"] == 1 and engine["timed_passes"] >= 3
    assert engine["final_exit_wall_s"] > 0 and engine["dynamic_wall_s"] > 0
    assert engine["speedup"] == engine["final_exit_wall_s"] / engine["dynamic_wall_s"]
    last = report(res).splitlines()[-1]  # what the user saves is printed last
    assert f"dynamic engine {engine['dynamic_wall_s']:.4f} s" in last
    assert f"final exit with every early exit off {engine['final_exit_wall_s']:.4f} s" in last
    assert f"{engine['speedup']:.2f}x faster, test accuracy {100 * res['test']['accuracy']:.2f}%" \
        in last
    assert last in (run / "eval" / "results.md").read_text()
    # what was timed as "the final exit alone" is the final exit: every sample leaves there,
    # with the static path's final predictions
    _, dm, net, cost = load_run(run)
    final = DynamicEngine(net, create_policy("confidence", math.inf), cost)
    assert final.skipped == [True] * (net.num_exits - 1)  # no early exit head runs
    for x, _ in make_loader(dm.test_dataset, 256, shuffle=False):
        out = final(x)
        assert bool((out.exit == net.num_exits - 1).all())
        with torch.inference_mode():
            assert torch.equal(out.pred, net(x).logits[-1].argmax(1))
