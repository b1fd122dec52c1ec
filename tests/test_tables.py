"""Every paper table's whole pipeline (sweeps, calibration, table files) on tiny data: no table rots.

The data root (``data_root`` of conftest) has every data set the tables read, real ones where
../shared/data has them and small ones otherwise, Visual Wake Words among them: its T-RecX row
runs too (``tables.py`` adds it only where ``data_root/vww`` exists). One test per table (the
baselines table with the EENets table, whose backbone it reuses), so that two workers share
them; the long ones are ``slow`` (``make test-slow``), measured in the commits that mark them.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "tables.py"


def _smoke_table(name: str, out: Path, data: Path) -> dict:
    """``SMOKE=1 experiments/tables.py <name>`` into ``out``; the table's JSON, its files checked."""
    env = {**os.environ, "WANDB_MODE": "disabled", "SMOKE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), name, "--out", str(out), "--data", str(data)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / f"{name}.md").read_text()
    table = json.loads((out / f"{name}.json").read_text())
    assert table["smoke"] is True and table["rows"], name
    assert "SMOKE" in md and "Paper:" in md and "Deviations:" in md
    for row in table["rows"]:  # every row knows the command that made it, its seed and epochs
        assert row["command"].startswith("eenet-train -m "), row
        assert row["seed"] == 0 and row["epochs"] == 1
    return table


@pytest.mark.slow
def test_smoke_tables_eenets_and_baselines(tmp_path, data_root):
    eenets = _smoke_table("eenets", tmp_path, data_root.path)
    base = _smoke_table("baselines", tmp_path, data_root.path)
    # the backbone without exits is trained once, by the first table, and reused by the next
    assert (tmp_path / "runs" / "shared" / "mnist_plain" / ".done").is_file()
    assert [s.get("reused") for s in base["sweeps"] if s["key"] == "mnist_plain"] == [True]
    assert {r["job"] for r in base["rows"] if r["method"] == "resnet20 (no exits)"} == {
        r["job"] for r in eenets["rows"] if r["model"] == "resnet20 (no exits)"}
    # every CIFAR-10 method row carries its certified evaluation beside the empirical one
    cifar = [r for r in base["rows"] if r["dataset"].startswith("cifar10_jpeg")
             and r["method"] != "resnet20 (no exits)"]
    assert cifar and all(isinstance(r["certified"], bool) and 0 <= r["certified_accuracy"] <= 1
                         for r in cifar)
    for r in cifar:
        saved = json.loads((Path(r["job"]) / "eval" / f"{r['policy']}_certified" / "results.json")
                           .read_text())
        assert saved["calibration"]["guarantee"]["method"] == "ltt"
        assert saved["test"]["accuracy"] == r["certified_accuracy"]
    assert "certified: test acc % / cost" in (tmp_path / "baselines.md").read_text()


@pytest.mark.slow  # 30 s; PTEENet stays in make test through test_posttrain and its experiment configs
def test_smoke_table_pteenet(tmp_path, data_root):
    pte = _smoke_table("pteenet", tmp_path, data_root.path)
    branches = [r for r in pte["rows"] if r["model"] == "PTEENet branches"]
    assert branches and all(r["hash_unchanged"] for r in branches)  # post-training froze the backbone
    assert {r["model"] for r in pte["rows"]} == {"backbone", "PTEENet branches"}


@pytest.mark.slow
def test_smoke_table_trecx(tmp_path, data_root):
    trecx = _smoke_table("trecx", tmp_path, data_root.path)
    assert {r["model"] for r in trecx["rows"]} == {"no exits", "T-RecX", "T-RecX + mitigation"}
    # one of each per setting, VWW included
    assert collections.Counter(r["setting"] for r in trecx["rows"]) == {
        "resnet8 / CIFAR-10 (JPEG)": 3, "DS-CNN / KWS subset": 3, "MobileNetV1 / VWW": 3}
    # each T-RecX row: how far its calibrated test accuracy fell below the same setting's and
    # seed's model without exits, and whether its thresholds reached the val target
    plain = {(r["setting"], r["seed"]): r["accuracy"] for r in trecx["rows"]
             if r["model"] == "no exits"}
    for r in trecx["rows"]:
        if r["model"] != "no exits":
            assert r["below_plain"] == plain[r["setting"], r["seed"]] - r["accuracy"]
            assert isinstance(r["val_target_reached"], bool)
    assert "points below no exits (test)" in trecx["markdown"].splitlines()[0]
