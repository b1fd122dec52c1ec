"""The results file of a run (``results.json``) and its markdown table.

Schema (later features add keys, never remove these)::

    {"dataset", "backbone", "num_classes", "backbone_macs",
     "exits": [{"name", "stage", "macs", "cost_fraction", "val_accuracy", "test_accuracy"}, ...],
     "policy": {"name", "thresholds"},
     "test": {"accuracy", "avg_cost_fraction", "exit_rates", "n"},
     "config"}

MACs follow fvcore's convention (one fused multiply-add = one flop). Files are
written atomically: a temporary file in the same folder, then a rename, so an
interrupted write never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import json
from pathlib import Path

from eenet.cost import CostTable
from eenet.io import atomic_write_text
from eenet.reporting.markdown import results_markdown


def make_results(dataset: str, backbone: str, num_classes: int, cost: CostTable,
                 val: dict, test: dict, policy: dict, config: dict, **extra) -> dict:
    """Assemble the results dict from the cost table and the val/test metrics.

    ``val`` and ``test`` are :class:`eenet.training.ExitMetrics` results
    (``exit_acc``, ``exit_rates``, ``acc``, ``avg_cost``, ``n``, ...).
    """
    exits = []
    for i, e in enumerate(cost.exits):
        row = {"name": e.name, "stage": e.stage, "macs": e.macs, "head_macs": e.head_macs,
               "cost_fraction": e.cost_fraction,
               "val_accuracy": val["exit_acc"][i], "test_accuracy": test["exit_acc"][i]}
        if "overthinking" in test:
            row["test_overthinking"] = test["overthinking"][i]
        exits.append(row)
    out = {
        "dataset": dataset,
        "backbone": backbone,
        "num_classes": num_classes,
        "backbone_macs": cost.backbone_macs,
        "macs_convention": cost.convention,
        "input_size": list(cost.input_size),
        "exits": exits,
        "policy": policy,
        "test": {"accuracy": test["acc"], "avg_cost_fraction": test["avg_cost"],
                 "exit_rates": test["exit_rates"], "n": test["n"]},
        "val": {"accuracy": val["acc"], "avg_cost_fraction": val["avg_cost"],
                "exit_rates": val["exit_rates"], "n": val["n"]},
    }
    for key in ("mixture_acc", "expected_cost", "oracle_acc"):
        if key in test:
            out["test"][key] = test[key]
    out.update(extra)
    out["config"] = config
    return out


def write_results(folder: str | Path, results: dict) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``folder`` atomically."""
    folder = Path(folder)
    js, md = folder / "results.json", folder / "results.md"
    atomic_write_text(js, json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(md, results_markdown(results) + "\n")
    return js, md
