"""Backbone weights from earlier runs or files, and a hash of a module's state.

Post-training (PTEENet, Lahiany & Aperstein, IEEE Access 2022) starts from a
trained backbone: ``load_backbone_weights`` takes an eenet run folder, its
``model.pt`` (keys ``backbone.*`` are used) or a plain backbone ``state_dict``;
files are read with ``torch.load(..., weights_only=True)`` and a mismatch names
the keys. ``state_hash`` fingerprints every tensor of a module's state dict
(parameters and BatchNorm statistics), to show a frozen backbone is untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from eenet.errors import EENetError
from eenet.io import safe_torch_load
from eenet.models.early_exit import load_state_dict_checked


def state_hash(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every state-dict tensor."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_backbone_weights(backbone: nn.Module, source: str | Path) -> Path:
    """Load ``source`` (a run folder, its model.pt, or a backbone state_dict) into ``backbone``."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise EENetError(f"backbone checkpoint not found: {path}")
    state = safe_torch_load(path, what="backbone checkpoint")
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        state = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict):
        raise EENetError(f"{path} does not hold a state_dict")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    load_state_dict_checked(backbone, state, what=f"backbone checkpoint {path}")
    return path
