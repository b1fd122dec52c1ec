"""``eenet-eval guarantee=...``: certified thresholds chosen on val, used on test, reported.

The certification itself is tested against its formulas in tests/test_guarantee.py; here,
that the job uses the certified point (not the uncorrected search's) for the dynamic
engine, records the ``guarantee`` section, and refuses bad options in one line.
"""

from __future__ import annotations

import json

import pytest

from eenet.cli.common import run_job
from eenet.config import compose_config
from eenet.jobs.evaluate import evaluate, report
from eenet.jobs.train import train


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guarantee") / "run"
    train(compose_config(["trainer.max_epochs=2", "logger=none", "trainer.accelerator=cpu",
                          "trainer.enable_progress_bar=false"], output_dir=out))
    return out


def eval_config(run, out, *extra):
    return compose_config([f"run={run}", "timing_passes=0", *extra], output_dir=out,
                          config_name="eval")


@pytest.mark.parametrize("method", ["ltt", "ucb", "crc"])
def test_the_certified_point_is_the_one_used_on_test(digits_run, tmp_path, method):
    saved = evaluate(eval_config(digits_run, tmp_path / method, f"guarantee={method}",
                                 "alpha=0.05", "risk=drop"))
    g = saved["calibration"]["guarantee"]
    assert (g["method"], g["risk"], g["alpha"], g["delta"]) == (method, "drop", 0.05, 0.1)
    assert g["n"] == saved["val"]["n"] and g["n_order"] + g["n_test"] == g["n"]
    # the dynamic engine ran the certified thresholds, not the uncorrected search's
    assert saved["policy"]["thresholds"] == g["thresholds"]
    assert saved["calibration"]["chosen"]["thresholds"] == g["thresholds"]
    on_disk = json.loads((tmp_path / method / "results.json").read_text())
    assert on_disk["calibration"]["guarantee"]["thresholds"] == g["thresholds"]
    assert f"Guarantee ({method}" in report(saved)
    if g["certified"] and g["empirical"] is not None:
        # the certified point is never cheaper than the uncorrected one for the same level
        # on the same split: certifying can only remove points from what the search may take
        assert g["cost_of_guarantee"] >= -1e-12


@pytest.mark.parametrize("extra,message", [
    (["guarantee=ltt"], "give alpha=A"),
    (["guarantee=ltt", "alpha=0.05", "tolerance=1"], "drop tolerance"),
    (["alpha=0.05", "tolerance=1"], "give guarantee=ltt|ucb|crc too"),
    (["guarantee=bonferroni", "alpha=0.05"], "bonferroni"),
    (["guarantee=ltt", "alpha=1.5"], "alpha=1.5"),
    (["guarantee=ltt", "alpha=0.05", "delta=0"], "delta must be a number in (0, 1)"),
    (["guarantee=ltt", "alpha=0.05", "risk=loss"], "risk"),
])
def test_bad_guarantee_options_are_one_line(digits_run, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as code:
        run_job(evaluate, eval_config(digits_run, out, *extra))
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
