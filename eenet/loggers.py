"""Experiment loggers: Weights & Biases that never hangs on a missing network, and CSV.

``WandbLogger`` raises when no API key is configured and no mode is set, and
with a key but no network it waits for about 100 s before failing. eenet picks
the mode itself: online only when a key is configured (``WANDB_API_KEY`` or a
``api.wandb.ai`` entry in ``~/.netrc``, where ``wandb login`` puts it),
offline otherwise, and always the user's ``WANDB_MODE`` when that is set.
An offline run is uploaded later with ``wandb sync <run folder>``.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def wandb_key_configured() -> bool:
    """Whether a W&B API key is available without asking the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(offline: bool | None = None) -> str:
    """``online``, ``offline`` or ``disabled``: WANDB_MODE if set, else by key and ``offline``."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if offline is None:
        offline = not wandb_key_configured()
    return "offline" if offline else "online"


def wandb_logger(project: str = "eenet", save_dir: str = ".", offline: bool | None = None,
                 **kwargs):
    """A Lightning ``WandbLogger`` whose mode is chosen as described in the module docstring.

    Args:
        project: W&B project.
        save_dir: folder for the run files (``<save_dir>/wandb/...``).
        offline: force offline (``True``) or online (``False``); ``None`` decides by key.
        **kwargs: passed to ``WandbLogger`` (``name``, ``group``, ``tags``, ...).
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(offline)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=str(save_dir), offline=(mode == "offline"),
                       mode=mode, **kwargs)
