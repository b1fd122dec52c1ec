"""Shared test fixtures: quiet W&B, torch threads, the real data folder, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# W&B stays off in tests, except where a test turns offline mode on for itself.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
# two threads, or OMP_NUM_THREADS when set (`make test` runs two one-thread workers)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


def compose_train_config(overrides: list[str], output_dir: Path):
    """The real ``conf/train.yaml`` with ``overrides``, writing into ``output_dir``."""
    from eenet.config import compose_config

    return compose_config([f"data_root={SHARED_DATA}", *overrides], output_dir)


@pytest.fixture
def train_config(tmp_path):
    """``train_config(["dataset=digits", ...])`` -> composed config writing into tmp_path/run."""

    def make(overrides=(), output_dir=None):
        return compose_train_config(list(overrides), output_dir or tmp_path / "run")

    return make
