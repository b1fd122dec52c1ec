"""Helpers for experiment scripts: machine facts and the JSON report saved next to the script.

Every benchmark or accuracy/cost script under ``experiments/`` prints a table
and saves a JSON file beside itself with the command line, the machine and the
library versions, so each quoted figure can be traced to the run that made it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from eenet.io import atomic_write_text


def machine_info() -> dict[str, Any]:
    """CPU, thread count, Python and library versions of the running machine."""
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
    }


def save_report(script: str, payload: dict, suffix: str = "") -> Path:
    """Write ``<script stem><suffix>.json`` beside ``script`` with command, machine and time."""
    path = Path(script).resolve()
    out = path.with_name(f"{path.stem}{suffix}.json")
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": machine_info(), **payload}
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")
    return out
