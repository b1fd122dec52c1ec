"""``eenet-eval temperature=true``: per-exit temperatures fitted on val and used by the policy
everywhere it scores (calibration, static path, dynamic engine, ONNX runner), reported and drawn.

One digits run is trained for this module. The temperatures' fit and the calibration error
are tested against their formulas in tests/test_temperature.py; here, that the job fits on
val only, that every path applies the same temperatures (decisions equal to the sample),
that ``temperature=false`` is the code without temperatures, what results.json and the
plots hold, and that bad options are one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from test_never_on_test import changed_test_split

import eenet.jobs.evaluate as evaluate_job
import eenet.reporting.plots as plots
from eenet.calibration import CachedExits, Calibrator, cache_exit_outputs
from eenet.calibration.temperature import (apply_temperatures, exit_reliability, fit_temperatures,
                                           split_calibration_errors)
from eenet.cli.common import run_job
from eenet.config import compose_config
from eenet.data.batching import make_loader
from eenet.errors import EENetError
from eenet.export.onnx_runner import OnnxEarlyExitRunner
from eenet.inference import DynamicEngine
from eenet.jobs.evaluate import evaluate, report
from eenet.jobs.export import export_run
from eenet.jobs.train import train
from eenet.policies import TEMPERATURE_POLICIES, create_policy
from eenet.reporting.results import PLAIN_FORMAT, TEMPERATURES_FROM, RunResults, read_policy
from eenet.runs import load_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("temperature_run")
    train(compose_config(["trainer.max_epochs=2", "logger=none", "trainer.accelerator=cpu",
                          "trainer.enable_progress_bar=false", "checkpoint.enabled=false",
                          "anytime=false"], output_dir=out))
    return out


def eval_config(run, out, *extra):
    return compose_config([f"run={run}", "timing_passes=0", *extra], output_dir=out,
                          config_name="eval")


#: a budget: this short run's first exit beats its final exit, so a tolerance lets every sample
#: out there (thresholds -inf), where temperatures could not change a decision
TEMPERED = ("policy=max_prob", "budget=0.5", "temperature=true")


@pytest.fixture(scope="module")
def tempered(digits_run, tmp_path_factory):
    """One evaluation with temperatures: its folder and results."""
    out = tmp_path_factory.mktemp("tempered") / "eval"
    return out, evaluate(eval_config(digits_run, out, *TEMPERED))


@pytest.fixture(scope="module")
def cached(digits_run):
    """The run's network, cost table and cached val / test outputs (one static pass each)."""
    _, dm, net, cost = load_run(digits_run)
    val = cache_exit_outputs(net, make_loader(dm.val_dataset, 256, shuffle=False))
    test = cache_exit_outputs(net, make_loader(dm.test_dataset, 256, shuffle=False))
    return dm, net, cost, val, test


def without_wall_clock(results: dict) -> dict:
    out = json.loads(json.dumps(results))
    del out["engine"]["wall_s"]
    out["engine"].pop("machine", None)  # where it was timed (recorded since after temperatures)
    return out


# ---- results.json ---------------------------------------------------------------------------

def test_temperatures_are_fitted_on_val_used_and_recorded(tempered, cached):
    out, saved = tempered
    _, net, cost, val, test = cached
    section = saved["calibration"]["temperature"]
    temps = saved["policy"]["temperatures"]
    # the fit on the validation outputs, to the bit, one per exit (the final one included)
    assert temps == fit_temperatures(val).temperatures == section["fit"]["temperatures"]
    assert len(temps) == net.num_exits and section["fitted_on"] == "val"
    # the thresholds are those searched on the scaled val scores (the policy's temperatures)
    scaled = Calibrator(val, "max_prob", cost, temperatures=temps)
    assert saved["calibration"]["chosen"] == scaled.calibrate(budget=0.5).chosen.to_dict()
    assert not torch.equal(scaled.scores, Calibrator(val, "max_prob", cost).scores)
    # per-exit ECE on both splits, before and after, and their sums
    for split, data in (("val", val), ("test", test)):
        assert section[split] == split_calibration_errors(temps, data)
        assert section[split]["ece_sum_after"] == sum(section[split]["ece_after"])
        assert len(section[split]["ece_before"]) == net.num_exits
    # the layout: format 3 (older eenets refuse it rather than drop the temperatures)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == saved and saved["format_version"] == TEMPERATURES_FROM
    assert RunResults.from_dict(saved).to_dict() == saved
    assert read_policy(saved, "results.json") == ("max_prob", saved["policy"]["thresholds"], temps)
    assert "Temperatures per exit (fitted by NLL on val" in report(saved)
    assert "Temperatures per exit" in (out / "results.md").read_text()


def test_temperature_false_is_the_evaluation_without_temperatures(digits_run, cached, tmp_path):
    """``temperature=false`` and a configuration without the key (as before the option) give
    the same results; no temperature key is written; the scores are the formulas' own."""
    off = evaluate(eval_config(digits_run, tmp_path / "off", "policy=max_prob", "tolerance=1",
                               "temperature=false"))
    cfg = eval_config(digits_run, tmp_path / "absent", "policy=max_prob", "tolerance=1")
    with open_dict(cfg):
        del cfg["temperature"]
    absent = evaluate(cfg)
    assert without_wall_clock(off) == without_wall_clock(absent)
    assert set(off["policy"]) == {"name", "thresholds"} and "temperature" not in off["calibration"]
    assert off["format_version"] == PLAIN_FORMAT
    # the policies' scores without temperatures: exactly the pre-temperature formulas
    _, _, cost, val, _ = cached
    out = val.outputs
    p = [F.softmax(lg.float(), dim=1) for lg in out.logits[:-1]]
    expected = {"max_prob": torch.stack([q.amax(dim=1) for q in p], 1),
                "entropy": torch.stack([(F.log_softmax(lg.float(), dim=1).exp()
                                         * F.log_softmax(lg.float(), dim=1)).sum(dim=1)
                                        for lg in out.logits[:-1]], 1)}
    for name, scores in expected.items():
        assert torch.equal(create_policy(name).scores(out), scores)
        assert torch.equal(Calibrator(val, name, cost).scores, scores)


#: the last commit before temperatures existed
BEFORE_TEMPERATURES = "f9e4cef"
EVAL_SCRIPT = """
import sys
from eenet.config import compose_config
from eenet.jobs.evaluate import evaluate
evaluate(compose_config(sys.argv[2:], output_dir=sys.argv[1], config_name="eval"))
"""


@pytest.mark.slow  # 14 s; a regression check against the code before temperatures
def test_temperature_false_equals_the_code_before_temperatures(digits_run, tmp_path):
    """The same evaluation by the code of the last commit before temperatures (its source
    from git, run in its own process) and by this code with ``temperature=false``: the
    same results.json (the wall-clock time of the test pass aside) and results.md."""
    old = tmp_path / "old_source"
    old.mkdir()
    try:
        archive = subprocess.run(["git", "archive", BEFORE_TEMPERATURES, "eenet"], cwd=REPO,
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git history with commit {BEFORE_TEMPERATURES} (a shallow clone or an "
                    f"archive has none)")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    # the run as that code wrote runs: without the keys added since (it refuses a newer file)
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    res = json.loads((run / "results.json").read_text())
    res.pop("training_segments")
    (run / "results.json").write_text(json.dumps(res))
    options = [f"run={run}", "timing_passes=0", "threads=1", "policy=max_prob",
               "budget=0.5"]
    folders = {}
    for name, path, extra in (("before", str(old), []), ("now", str(REPO), ["temperature=false"])):
        folders[name] = tmp_path / name
        # from tmp_path: run from the repository, '' on sys.path would import this eenet
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", EVAL_SCRIPT, str(folders[name]), *options,
                               *extra], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    before, now = (json.loads((folders[k] / "results.json").read_text()) for k in ("before", "now"))
    assert without_wall_clock(now) == without_wall_clock(before)
    assert (folders["now"] / "results.md").read_text() == (folders["before"] / "results.md").read_text()
    assert not (folders["before"] / "reliability.png").exists()  # the old code: really run


def test_temperatures_never_see_the_test_split(digits_run, tempered, tmp_path, monkeypatch):
    """Every test label moved and the test images replaced by noise: the temperatures, the
    val ECE and the thresholds are identical; the test figures move (the change arrived)."""
    _, before = tempered
    monkeypatch.setattr(evaluate_job, "load_run", changed_test_split(labels=True, images=True))
    after = evaluate(eval_config(digits_run, tmp_path / "poisoned", *TEMPERED))
    tb, ta = before["calibration"]["temperature"], after["calibration"]["temperature"]
    assert ta["fit"] == tb["fit"] and ta["val"] == tb["val"]
    assert after["policy"] == before["policy"]
    assert after["calibration"]["chosen"] == before["calibration"]["chosen"]
    assert ta["test"] != tb["test"] and after["test"]["accuracy"] != before["test"]["accuracy"]
    # and had the fit read that test split, the temperatures would have moved
    _, dm, net, _ = changed_test_split(labels=True, images=True)(digits_run)
    poisoned = cache_exit_outputs(net, make_loader(dm.test_dataset, 256, shuffle=False))
    assert fit_temperatures(poisoned).temperatures != before["policy"]["temperatures"]


# ---- one mechanism: static path, engine and runner make the same decisions ------------------

def temperature_sets(val, num_exits):
    """The temperatures fitted on val, and a set far from 1 so that the decisions must move."""
    return [fit_temperatures(val).temperatures, [0.5, 3.0, 1.7, 0.8, 2.0][:num_exits]]


@pytest.mark.parametrize("name", TEMPERATURE_POLICIES)
def test_engine_equals_static_path_and_policy_with_temperatures(cached, name):
    _, net, cost, val, test = cached
    moved = 0
    for temps in temperature_sets(val, net.num_exits):
        res = Calibrator(val, name, cost, temperatures=temps).calibrate(budget=0.5)
        policy = create_policy(name, res.chosen.thresholds, temps)
        static = policy.decide(test.outputs)
        engine = DynamicEngine(net, policy, cost)
        xs = torch.cat([x for x, _ in make_loader(cached[0].test_dataset, 128, shuffle=False)])
        got = engine(xs)
        assert torch.equal(got.exit, static)
        preds = torch.stack([lg.argmax(1) for lg in test.logits], 1)
        assert torch.equal(got.pred, preds.gather(1, static.view(-1, 1)).view(-1))
        one = torch.cat([engine(xs[b:b + 1]).exit for b in range(40)])  # batch 1's own path
        assert torch.equal(one, static[:40])
        # the same thresholds without the temperatures decide differently for some samples
        plain = create_policy(name, res.chosen.thresholds).decide(test.outputs)
        moved += int((plain != static).sum())
    assert moved > 0


def test_export_and_runner_reproduce_the_engine_with_temperatures(digits_run, tempered, cached,
                                                                  tmp_path):
    out, saved = tempered
    _, net, cost, _, _ = cached
    cfg = compose_config([f"run={digits_run}", f"eval={out / 'results.json'}",
                          f"out={tmp_path / 'onnx'}"], config_name="export")
    manifest = json.loads(export_run(cfg).read_text())
    assert manifest["policy"]["temperatures"] == saved["policy"]["temperatures"]
    assert manifest["format_version"] == 4 and "logits_i / T_i" in manifest["policy"]["rule"]
    runner = OnnxEarlyExitRunner(tmp_path / "onnx", threads=1)
    engine = DynamicEngine(net, create_policy(*read_policy(saved, "results.json")), cost)
    exits = []
    for x, _ in make_loader(cached[0].test_dataset, 128, shuffle=False):
        pred, exit_index, _ = runner(x.numpy())
        ref = engine(x)
        np.testing.assert_array_equal(exit_index, ref.exit.numpy())
        np.testing.assert_array_equal(pred, ref.pred.numpy())
        exits.append(torch.from_numpy(exit_index))
    # and the evaluation's own dynamic engine on test: the same exit distribution
    exits = torch.cat(exits)
    counts = torch.bincount(exits, minlength=net.num_exits).double()
    assert (counts / counts.sum()).tolist() == saved["test"]["exit_rates"]
    # the runner applies the temperatures: without them, some samples leave elsewhere
    xs = torch.cat([x for x, _ in make_loader(cached[0].test_dataset, 512, shuffle=False)])
    runner.temperatures = None
    assert (torch.from_numpy(runner(xs.numpy())[1]) != exits).any()


def test_export_takes_temperatures_by_hand_as_an_evaluation_carries_them(digits_run, tempered,
                                                                         cached, tmp_path):
    """temperatures=[...] (with policy= and thresholds=) writes what eval=results.json writes."""
    out, saved = tempered
    from_eval = export_run(compose_config([f"run={digits_run}", f"eval={out / 'results.json'}",
                                           f"out={tmp_path / 'a'}", "check=false"],
                                          config_name="export"))
    p = saved["policy"]
    by_hand = export_run(compose_config(
        [f"run={digits_run}", f"policy={p['name']}", f"thresholds={p['thresholds']}",
         f"temperatures={p['temperatures']}", f"out={tmp_path / 'b'}", "check=false"],
        config_name="export"))
    a, b = (json.loads(path.read_text()) for path in (from_eval, by_hand))
    assert b["format_version"] == 4 and b["policy"] == a["policy"]
    xs = torch.cat([x for x, _ in make_loader(cached[0].test_dataset, 512, shuffle=False)])
    ra, rb = (OnnxEarlyExitRunner(path.parent, threads=1)(xs.numpy()) for path in (from_eval,
                                                                                   by_hand))
    np.testing.assert_array_equal(ra[1], rb[1])
    np.testing.assert_array_equal(ra[0], rb[0])


@pytest.mark.parametrize("extra,message", [
    (["eval={results}", "temperatures=[1.0,1.0,1.0]"],
     "give either eval=RESULTS_JSON or temperatures=, not both"),
    (["policy=confidence", "thresholds=0.5", "temperatures=[1.0,1.0,1.0]"],
     "the confidence policy"),
    (["policy=max_prob", "thresholds=0.5", "temperatures=[1.0,1.0]"],
     "2 temperatures given for 3 exits"),
    (["policy=entropy", "thresholds=-0.1", "temperatures=[1.0,0,1.0]"],
     "temperature of exit 1 must be a finite number > 0"),
    (["policy=max_prob", "thresholds=0.5", "temperatures=warm"], "temperatures must be a list"),
])
def test_bad_export_temperatures_are_one_line_and_write_nothing(digits_run, tempered, tmp_path,
                                                                capsys, monkeypatch, extra, message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    results = tempered[0] / "results.json"
    out = tmp_path / "onnx"
    cfg = compose_config([f"run={digits_run}", f"out={out}",
                          *(e.format(results=results) for e in extra)], config_name="export")
    with pytest.raises(SystemExit) as code:
        run_job(export_run, cfg)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("policy,message", [
    ("confidence", "the confidence policy takes no temperatures"),
    ("max_prob", "policy temperatures must be {n} finite numbers"),
])
def test_the_runner_refuses_temperatures_it_cannot_apply(digits_run, tmp_path, policy, message):
    cfg = compose_config([f"run={digits_run}", "policy=max_prob", "thresholds=0.5",
                          f"out={tmp_path / 'onnx'}", "check=false"], config_name="export")
    path = export_run(cfg)
    m = json.loads(path.read_text())
    assert m["format_version"] == 3 and "temperatures" not in m["policy"]  # none given
    n = len(m["pieces"])  # one temperature per exit
    temps = [1.0] * n if policy == "confidence" else [-2.0] + [1.0] * (n - 1)
    m.update(format_version=4, policy={**m["policy"], "name": policy, "temperatures": temps})
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert message.format(n=n) in str(err.value) and "\n" not in str(err.value)


def test_a_policy_without_a_logits_temperature_refuses_one(cached):
    _, net, cost, val, _ = cached
    for name in ("confidence", "patience"):
        with pytest.raises(EENetError) as err:
            create_policy(name, None, [1.0] * net.num_exits)
        assert "\n" not in str(err.value) and f"the {name} policy" in str(err.value)
        with pytest.raises(EENetError):
            Calibrator(val, name, cost, temperatures=[1.0] * net.num_exits)
    with pytest.raises(EENetError, match=f"2 temperatures given for {net.num_exits} exits"):
        DynamicEngine(net, create_policy("max_prob", 0.5, [1.0, 2.0]), cost)
    with pytest.raises(EENetError, match="temperature of exit 1 must be a finite number > 0"):
        create_policy("entropy", -0.5, [1.0, 0.0, 1.0])


# ---- calibration error on a model that is over-confident by construction ---------------------

def overconfident(factors, n, seed, k=10):
    """Cached outputs whose exit i gives factors[i] x the true logits z, the labels drawn from
    softmax(z): softmax(z) is exactly calibrated, so an exit with a factor f > 1 is
    over-confident, and dividing its logits by T = f calibrates it exactly."""
    g = torch.Generator().manual_seed(seed)
    true = 2.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.multinomial(F.softmax(true, 1), 1, generator=g).view(-1)
    return CachedExits([(f * true).float() for f in factors], [torch.zeros(n) for _ in factors], y)


def test_temperatures_lower_the_calibration_error_of_an_overconfident_model():
    factors = (4.0, 3.0, 2.0)
    val, test = overconfident(factors, 20_000, seed=0), overconfident(factors, 20_000, seed=1)
    temps = fit_temperatures(val).temperatures
    assert all(t > 1 for t in temps)  # over-confident: every fitted T softens the softmax
    # T = f calibrates exactly, so ECE after is sampling and binning noise only; before, each
    # exit's confidence is that of softmax(f z) against the accuracy of softmax(z)
    errors = split_calibration_errors(temps, test)  # on samples the fit never saw
    for before, after in zip(errors["ece_before"], errors["ece_after"]):
        assert after < before
    assert errors["ece_sum_after"] < errors["ece_sum_before"]
    # the policy's own scores with the temperatures are those of the scaled outputs
    for name in TEMPERATURE_POLICIES:
        assert torch.equal(Calibrator(test, name, [0.2, 0.5, 1.0], temperatures=temps).scores,
                           Calibrator(apply_temperatures(test, temps), name, [0.2, 0.5, 1.0]).scores)


# ---- bad options ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["policy=max_prob", "temperature=maybe"], "temperature='maybe' must be true or false"),
    (["temperature=true"], "temperature=true: temperatures rescale the class logits that the "
                           "max_prob and entropy policies score; the confidence policy scores its "
                           "own confidence head"),
    (["policy=patience", "temperature=true"], "the patience policy reads only the exits' argmaxes"),
])
def test_bad_temperature_options_are_one_line(digits_run, tmp_path, capsys, monkeypatch, extra,
                                              message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as code:
        run_job(evaluate, eval_config(digits_run, out, "tolerance=1", *extra))
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


# ---- plots ------------------------------------------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots save, by file name (their artists, not the pixels)."""
    figures = {}
    finish = plots._finish

    def keep(fig, ax, path, title):
        figures[str(path).rsplit("/", 1)[-1]] = fig
        return finish(fig, ax, path, title)

    monkeypatch.setattr(plots, "_finish", keep)
    return figures


def marker(fig, prefix):
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith(prefix)]
    assert len(lines) == 1, [ln.get_label() for ln in fig.axes[0].get_lines()]
    return float(lines[0].get_xdata()[0]), float(lines[0].get_ydata()[0])


def test_curve_marks_the_certified_point_and_reliability_shows_before_and_after(
        digits_run, cached, tmp_path, drawn):
    out = tmp_path / "g"
    saved = evaluate(eval_config(digits_run, out, "policy=max_prob", "temperature=true",
                                 "guarantee=ltt", "alpha=0.05"))
    for name in ("curve.png", "exits.png", "reliability.png"):
        assert (out / name).stat().st_size > 0
    g = saved["calibration"]["guarantee"]
    curve = drawn["curve.png"]
    legend = [t.get_text() for t in curve.axes[0].get_legend().get_texts()]
    certified = next(t for t in legend if t.startswith("certified (ltt"))
    assert marker(curve, certified) == (g["chosen"]["avg_cost"], 100 * g["chosen"]["accuracy"])
    if (g.get("empirical") or {}).get("reachable"):
        assert marker(curve, "uncorrected search") == (g["empirical"]["avg_cost"],
                                                       100 * g["empirical"]["accuracy"])
    t = saved["test"]
    assert marker(curve, "chosen, on test") == (t["avg_cost_fraction"], 100 * t["accuracy"])
    # reliability: one panel per exit, the test split's bins before and after the temperatures
    _, net, _, _, test = cached
    temps = saved["policy"]["temperatures"]
    panels = [ax for ax in drawn["reliability.png"].axes if ax.containers]
    assert len(panels) == net.num_exits
    scaled = apply_temperatures(test, temps)
    for ax, raw_lg, scaled_lg in zip(panels, test.logits, scaled.logits):
        labels = [c.get_label() for c in ax.containers]
        assert [lb.split(" (ECE")[0] for lb in labels] == ["before", "after (T fitted on val)"]
        for bars, lg in zip(ax.containers, (raw_lg, scaled_lg)):
            d = exit_reliability(lg, test.targets)
            assert [b.get_height() for b in bars] == [a for a in d["accuracy"] if a is not None]
            assert f"ECE {100 * d['ece']:.2f}%" in bars.get_label()


def test_without_guarantee_or_temperature_the_plots_are_as_before(digits_run, cached, tmp_path,
                                                                   drawn):
    evaluate(eval_config(digits_run, tmp_path / "p", "policy=max_prob", "tolerance=1"))
    legend = [t.get_text() for t in drawn["curve.png"].axes[0].get_legend().get_texts()]
    assert "chosen on val (tolerance)" in legend and not any("certified" in t for t in legend)
    panels = [ax for ax in drawn["reliability.png"].axes if ax.containers]
    assert len(panels) == cached[1].num_exits
    assert all([c.get_label().split(" (ECE")[0] for c in ax.containers] == ["raw"] for ax in panels)
