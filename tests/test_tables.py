"""Every paper table's whole pipeline (sweeps, calibration, table files) on tiny data: no table rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_smoke_tables(tmp_path, shared_data):
    env = {**os.environ, "WANDB_MODE": "disabled", "SMOKE": "1"}
    script = Path(__file__).resolve().parent.parent / "experiments" / "tables.py"
    proc = subprocess.run([sys.executable, str(script), "all", "--out", str(tmp_path),
                           "--data", str(shared_data)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("eenets", "baselines", "pteenet", "trecx"):
        md = (tmp_path / f"{name}.md").read_text()
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["smoke"] is True and data["rows"], name
        assert "SMOKE" in md and "Paper:" in md and "Deviations:" in md
        for row in data["rows"]:  # every row knows the command that made it, its seed and epochs
            assert row["command"].startswith("eenet-train -m "), row
            assert row["seed"] == 0 and row["epochs"] == 1
    # the backbone without exits is trained once, by the first table, and reused by the next
    assert (tmp_path / "runs" / "shared" / "mnist_plain" / ".done").is_file()
    base = json.loads((tmp_path / "baselines.json").read_text())
    assert [s.get("reused") for s in base["sweeps"] if s["key"] == "mnist_plain"] == [True]
    assert {r["job"] for r in base["rows"] if r["method"] == "resnet20 (no exits)"} == {
        r["job"] for r in json.loads((tmp_path / "eenets.json").read_text())["rows"]
        if r["model"] == "resnet20 (no exits)"}
    pte = json.loads((tmp_path / "pteenet.json").read_text())
    assert all(r["hash_unchanged"] for r in pte["rows"] if r["model"] == "PTEENet branches")
    trecx = json.loads((tmp_path / "trecx.json").read_text())
    assert {r["model"] for r in trecx["rows"]} == {"no exits", "T-RecX", "T-RecX + mitigation"}
