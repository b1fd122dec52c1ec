"""What every entry point shares: one line and exit code 2 for a user's mistake."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, TypeVar

from omegaconf import DictConfig

from eenet.config import check_command_line
from eenet.errors import EENetError

T = TypeVar("T")


def run_job(job: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run ``job(cfg)``; a user's mistake prints one line and exits with code 2.

    ``HYDRA_FULL_ERROR=1`` lets the traceback through instead.
    """
    try:
        return job(cfg)
    except EENetError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def prepare_command_line() -> None:
    """Checks on ``sys.argv`` before Hydra starts, and warnings that are not the user's business."""
    # fvcore's import scripts its focal loss, which torch reports as deprecated
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    check_command_line(sys.argv[1:])
