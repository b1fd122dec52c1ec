"""Safe Lightning checkpoints: atomic writes, loading with ``weights_only=True``.

A checkpoint is written to a temporary file in the same folder, flushed to disk
and renamed over the old one, so a run killed at any moment (SIGKILL included)
leaves either the previous good checkpoint or the new one, never a truncated
file. Loading goes through ``torch.load(..., weights_only=True)``, which only
rebuilds tensors and plain Python values: a checkpoint carrying a pickled
object that would run code is refused, and the code never runs.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from eenet.io import atomic_write, safe_torch_load


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic ``save_checkpoint``, ``weights_only`` ``load_checkpoint``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return safe_torch_load(path, map_location or "cpu")


class EpochSeed(L.Callback):
    """Reseed Python, NumPy and torch at every epoch start from (seed, epoch).

    The data order and augmentation are already functions of (seed, epoch)
    (``eenet.data.batching.EpochBatchSampler``); this makes any other randomness
    of the training step (dropout, stochastic depth) start each epoch from the
    same state too, so a resumed run repeats an uninterrupted one.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import random

        import numpy as np

        s = (self.seed * 1_000_003 + trainer.current_epoch) % (2**32)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


class EpochTimer(L.Callback):
    """Wall-clock seconds of every training epoch (training steps and data loading only)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import time

        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import time

        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
