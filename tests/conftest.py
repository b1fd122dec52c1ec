"""Shared test fixtures: quiet W&B, two threads, the real data folder, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# W&B stays off in tests, except where a test turns offline mode on for itself.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


def compose_train_config(overrides: list[str], output_dir: Path):
    """The real ``conf/train.yaml`` composed with Hydra's compose API, writing into ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from eenet.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=False)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
        cfg.data_root = str(SHARED_DATA)
    return cfg


@pytest.fixture
def train_config(tmp_path):
    """``train_config(["dataset=digits", ...])`` -> composed config writing into tmp_path/run."""

    def make(overrides=(), output_dir=None):
        return compose_train_config(list(overrides), output_dir or tmp_path / "run")

    return make
