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
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from eenet.cost import CostTable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it.

    A process killed at any moment leaves either the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


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


def results_markdown(results: dict) -> str:
    """The per-exit table and the policy summary of a results dict."""
    pol = results["policy"]
    lines = [
        f"Dataset {results['dataset']}, backbone {results['backbone']}: "
        f"{results['backbone_macs'] / 1e6:.3f} M MACs per sample (fvcore: one multiply-add = one flop).",
        "",
        "| exit | after stage | MACs | cost fraction | val acc | test acc | test exit rate |",
        "|---|---|---|---|---|---|---|",
    ]
    rates = results["test"]["exit_rates"]
    for e, r in zip(results["exits"], rates):
        lines.append(f"| {e['name']} | {e['stage']} | {e['macs'] / 1e6:.3f} M | "
                     f"{e['cost_fraction']:.3f} | {100 * e['val_accuracy']:.2f} | "
                     f"{100 * e['test_accuracy']:.2f} | {100 * r:.1f}% |")
    t = results["test"]
    lines += ["", f"Policy {pol['name']} (thresholds {pol['thresholds']}): test accuracy "
                  f"{100 * t['accuracy']:.2f}% at average cost fraction {t['avg_cost_fraction']:.3f} "
                  f"(n={t['n']})."]
    if "mixture_acc" in t:
        lines.append(f"EENet mixture P_0: test accuracy {100 * t['mixture_acc']:.2f}%, "
                     f"expected cost E[C_0] {t['expected_cost']:.3f}.")
    if "oracle_acc" in t:
        over = [f"{e['name']} {100 * e['test_overthinking']:.2f}%" for e in results["exits"][:-1]
                if "test_overthinking" in e]
        lines.append(f"Overthinking (right at the exit, wrong at the final exit): "
                     f"{', '.join(over) or '-'}; oracle accuracy {100 * t['oracle_acc']:.2f}%.")
    return "\n".join(lines)


def write_results(folder: str | Path, results: dict) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``folder`` atomically."""
    folder = Path(folder)
    js, md = folder / "results.json", folder / "results.md"
    atomic_write_text(js, json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(md, results_markdown(results) + "\n")
    return js, md
