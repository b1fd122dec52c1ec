"""Every paper table's whole pipeline (sweeps, calibration, table files) on tiny data: no table rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys



def test_smoke_tables(tmp_path, shared_data):
    env = {**os.environ, "WANDB_MODE": "disabled", "SMOKE": "1"}
    proc = subprocess.run([sys.executable, "-m", "eenet.tables", "all", "--out", str(tmp_path),
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
    pte = json.loads((tmp_path / "pteenet.json").read_text())
    assert all(r["hash_unchanged"] for r in pte["rows"] if r["model"] == "PTEENet branches")
    trecx = json.loads((tmp_path / "trecx.json").read_text())
    assert {r["model"] for r in trecx["rows"]} == {"no exits", "T-RecX", "T-RecX + mitigation"}
