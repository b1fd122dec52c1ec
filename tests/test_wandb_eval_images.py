"""An evaluation's W&B run gets its three plots (curve, exit distribution, reliability), the
per-exit table and the summary (eenet.reporting.wandb.log_evaluation_results); wandb itself
is replaced by a recorder, so nothing is written or sent."""

from __future__ import annotations

import sys
import types

from eenet.reporting.wandb import log_evaluation_results


def test_evaluation_logs_every_plot_it_wrote(tmp_path, monkeypatch):
    logged, calls = {}, []

    class Run:
        def log(self, payload):
            logged.update(payload)

        def finish(self):
            calls.append("finish")

    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw["job_type"], kw["dir"])) or Run(),
        Image=lambda path: ("image", path),
        Table=lambda columns, data: ("table", list(columns), data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for name in ("curve.png", "exits.png", "reliability.png"):
        (tmp_path / name).write_bytes(b"png")
    results = {"test": {"accuracy": 0.9, "avg_cost_fraction": 0.4, "exit_rates": [0.7, 0.3]},
               "exits": [{"name": f"exit{i}", "stage": i, "macs": 10 * (i + 1),
                          "cost_fraction": 0.5 * (i + 1), "val_accuracy": 0.8,
                          "test_accuracy": 0.85} for i in range(2)]}
    log_evaluation_results({"project": "p", "offline": True}, results, tmp_path)
    images = {k: v[1] for k, v in logged.items() if isinstance(v, tuple) and v[0] == "image"}
    assert images == {"eval/curve": str(tmp_path / "curve.png"),
                      "eval/exit_distribution": str(tmp_path / "exits.png"),
                      "eval/reliability": str(tmp_path / "reliability.png")}
    assert logged["eval/test_accuracy"] == 0.9 and logged["eval/test_avg_cost"] == 0.4
    assert logged["eval/exits"][2] == [["exit0", 0, 10, 0.5, 0.8, 0.85, 0.7],
                                       ["exit1", 1, 20, 1.0, 0.8, 0.85, 0.3]]
    assert calls[0] == ("init", "eval", str(tmp_path)) and calls[-1] == "finish"
