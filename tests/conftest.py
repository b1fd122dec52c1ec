"""Shared test fixtures: quiet W&B, torch threads, the real data folder, composed configs.

The real data folder is ``../shared/data`` beside the repository, or ``$EENET_SHARED_DATA``
when set: ``EENET_SHARED_DATA=/nonexistent make test`` runs the tests as on a fresh clone.
Tests that read data take the ``data_root`` fixture: the real data sets where that folder has
them, small ones written in their own layout otherwise (``tests/small_data.py``), so they run
on any machine. The line before pytest's closing line counts the skips by reason.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch
from small_data import DataRoot, build_data_root, shared_data_dir

# W&B stays off in tests, except where a test turns offline mode on for itself.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
# two threads, or OMP_NUM_THREADS when set (`make test` runs two one-thread workers)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()  # $EENET_SHARED_DATA, else ../shared/data beside the repository


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test leaves torch's thread count as it found it. A script's main() run in a test
    sets it for the whole worker process (``--threads``); two workers left at two threads
    each oversubscribe two cores and slow every later test many times over."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> DataRoot:
    """A data root with MNIST, CIFAR-10 (JPEG), the keyword-spotting subset and VWW: each linked
    from SHARED_DATA when it has it, else written small (``small_data.build_data_root``); one per
    session (per xdist worker). ``data_root.is_real(name)`` says which."""
    return build_data_root(tmp_path_factory.mktemp("data_root"), SHARED_DATA)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """Right above pytest's closing line (after its short summary, hence the outermost wrapper):
    the number of skipped tests and each reason's count."""
    yield
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    listed = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    terminalreporter.write_line(f"{sum(reasons.values())} skipped" + (f": {listed}" if listed else ""))


def compose_train_config(overrides: list[str], output_dir: Path):
    """The real ``conf/train.yaml`` with ``overrides``, writing into ``output_dir``.

    On the CPU (``trainer.accelerator=cpu``; the config's own default is ``auto``, which
    takes a GPU where there is one), unless ``overrides`` say otherwise.
    """
    from eenet.config import compose_config

    return compose_config([f"data_root={SHARED_DATA}", "trainer.accelerator=cpu", *overrides],
                          output_dir)


@pytest.fixture
def train_config(tmp_path):
    """``train_config(["dataset=digits", ...])`` -> composed config writing into tmp_path/run."""

    def make(overrides=(), output_dir=None):
        return compose_train_config(list(overrides), output_dir or tmp_path / "run")

    return make
