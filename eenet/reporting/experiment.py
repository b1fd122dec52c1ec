"""Helpers for experiment scripts: machine facts, provenance and the JSON report saved next to the script.

Every benchmark or accuracy/cost script under ``experiments/`` prints a table
and saves a JSON file beside itself with the command line, the machine, the
library versions, the git revision of the code that made it (and whether the
working tree differed from it), the seeds, and which split chose each
operating point, so each quoted figure can be traced to the run that made it
and read for what it is (a point chosen on val is a result; a point chosen by
test accuracy is a reference at best).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eenet.io import atomic_write_text

# how an operating point (thresholds, policy, lambda, ...) was chosen: the values of ``chosen_on``
CHOSEN_ON = {
    "val": "chosen on the validation split",
    "test": "chosen by test accuracy (for reference only)",
    "fixed": "fixed in advance (no split consulted)",
    "every": "not chosen: every value that ran is reported",
}
# the keys save_report writes itself; a payload may not reuse them
REPORT_KEYS = ("command", "finished", "revision", "seeds", "chosen_on", "machine")
# at most this many changed paths are listed for a dirty tree (the count is always given)
MAX_CHANGED = 50
GIT_TIMEOUT_S = 30


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
        "torch": str(torch.__version__),  # a plain str: TorchVersion does not load weights_only
        "lightning": lightning.__version__,
        "platform": platform.platform(),
    }


def run_machine() -> dict[str, Any]:
    """:func:`machine_info` for a run folder's files: without the host's name (a run folder
    is data that may be sent to others)."""
    return {k: v for k, v in machine_info().items() if k != "hostname"}


def _existing_folder(where: str | Path) -> Path:
    """``where`` if it is a folder, else the nearest existing folder above it."""
    p = Path(where).resolve()
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p


def git_revision(where: str | Path) -> dict[str, Any]:
    """The git commit checked out at ``where`` and whether the working tree differs from it.

    Runs ``git rev-parse --verify HEAD`` and ``git status --porcelain`` in the
    checkout that holds ``where`` (a file or a folder; a path not yet written is
    read from its nearest existing folder). Never raises: without git, outside a
    checkout or in one without a commit, ``commit`` and ``dirty`` are ``None``
    and ``note`` says why.

    Returns:
        ``{"commit", "dirty", "changed", "changed_count", "note"}``: ``changed``
        lists up to :data:`MAX_CHANGED` lines of ``git status --porcelain``
        (modified, added, deleted and untracked paths; ignored files are not
        listed), ``changed_count`` counts them all.
    """
    folder = _existing_folder(where)
    # GIT_DIR and friends would point git elsewhere than the checkout of ``where``
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, env=env)

    def unknown(note: str, commit: str | None = None) -> dict[str, Any]:
        return {"commit": commit, "dirty": None, "changed": None, "changed_count": None,
                "note": note}

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            why = (head.stderr.strip().splitlines() or [f"exit code {head.returncode}"])[0]
            return unknown(f"no git commit at {folder}: {why}")
        commit = head.stdout.strip()
        status = git("status", "--porcelain", "--untracked-files=normal")
    except FileNotFoundError:
        return unknown("git is not installed (no git command)")
    except (OSError, subprocess.SubprocessError) as exc:
        return unknown(f"git did not answer in {folder}: {exc}")
    if status.returncode != 0:
        why = (status.stderr.strip().splitlines() or [f"exit code {status.returncode}"])[0]
        return unknown(f"git status failed at {folder}: {why}", commit)
    changed = [line for line in status.stdout.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:MAX_CHANGED],
            "changed_count": len(changed), "note": None}


def check_chosen_on(chosen_on: Mapping[str, str] | None) -> dict[str, str] | None:
    """``chosen_on`` as a plain dict, each value one of :data:`CHOSEN_ON` (ValueError otherwise)."""
    if chosen_on is None:
        return None
    bad = {k: v for k, v in chosen_on.items() if v not in CHOSEN_ON}
    if bad:
        raise ValueError(f"chosen_on values must be one of {', '.join(CHOSEN_ON)}; got {bad}")
    return dict(chosen_on)


def provenance(source: str | Path, seeds: Sequence[int] | Mapping[str, Any] | None = None,
               chosen_on: Mapping[str, str] | None = None,
               revision: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``revision``, ``seeds`` and ``chosen_on`` of a report made by the code at ``source``.

    Args:
        source: a file or folder of the code that made the report (its git checkout is read).
        seeds: the seeds of the runs behind the report (a list, or a mapping such as
            ``{"backbone": 0, "branches": 1}``); ``None`` when the script has none.
        chosen_on: for each thing chosen to make the reported operating point
            (``"thresholds"``, ``"policy"``, ``"lambda"``, ...), how it was chosen:
            a key of :data:`CHOSEN_ON`.
        revision: :func:`git_revision` taken when the run started (a long run in a
            shared checkout may see commits land before it ends); the commit at the
            time of writing is added as ``commit_at_save``. Default: read now.
    """
    if seeds is not None and not isinstance(seeds, Mapping):
        seeds = [int(s) for s in seeds]
    now = git_revision(source)
    rev = now if revision is None else {**revision, "commit_at_save": now["commit"]}
    return {"revision": rev, "seeds": seeds, "chosen_on": check_chosen_on(chosen_on)}


def save_report(script: str, payload: dict, suffix: str = "", *,
                seeds: Sequence[int] | Mapping[str, Any] | None = None,
                chosen_on: Mapping[str, str] | None = None,
                source: str | Path | None = None,
                revision: Mapping[str, Any] | None = None) -> Path:
    """Write ``<script stem><suffix>.json`` beside ``script`` with command, time, provenance and machine.

    Args:
        script: the script, or the report's own path (its stem names the file).
        payload: the results; may not use the keys in :data:`REPORT_KEYS`.
        suffix: added to the file's stem.
        seeds, chosen_on, revision: see :func:`provenance`; seeds and chosen_on are
            recorded as ``null`` when not given, so a report says that it does not know.
        source: a file of the code that made the report, whose git checkout gives
            ``revision`` (default: ``script``).
    """
    clash = [k for k in REPORT_KEYS if k in payload]
    if clash:
        raise ValueError(f"payload keys {clash} are written by save_report itself")
    path = Path(script).resolve()
    out = path.with_name(f"{path.stem}{suffix}.json")
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              **provenance(source if source is not None else path, seeds, chosen_on, revision),
              "machine": machine_info(), **payload}
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")
    return out
