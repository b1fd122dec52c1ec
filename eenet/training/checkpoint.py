"""Safe Lightning checkpoints: atomic writes, loading with ``weights_only=True``.

A checkpoint is written to a temporary file in the same folder, flushed to disk
and renamed over the old one, so a run killed at any moment (SIGKILL included)
leaves either the previous good checkpoint or the new one, never a truncated
file. Loading goes through ``torch.load(..., weights_only=True)``, which only
rebuilds tensors and plain Python values: a checkpoint carrying a pickled
object that would run code is refused, and the code never runs.
"""

from __future__ import annotations

import time
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
    """Wall-clock seconds of every training epoch, and which processes trained the run.

    An epoch's seconds run from its first training batch's loading to the end of the epoch,
    the validation at its end included (Lightning validates before ``on_train_epoch_end``).

    Both survive a resume: :meth:`state_dict` goes into every checkpoint (Lightning saves a
    callback's state) and :meth:`load_state_dict` reads it back from the checkpoint a run
    resumes from, so a resumed run's ``seconds`` hold every epoch up to that checkpoint and
    those run after it (ModelCheckpoint saves at an epoch's end, after this callback's
    ``on_train_epoch_end``, when validation runs once per epoch as in eenet's configs) and
    ``segments`` every process that trained it: the machine facts it was given (eenet-train:
    CPU, cores, torch threads, versions), the device, the epochs it ran and its wall seconds
    (from ``started``, the process's start, to its last checkpoint; the last process's to the
    end of training).
    """

    def __init__(self, machine: dict | None = None, started: float | None = None):
        self.seconds: list[float] = []
        self.earlier: list[dict] = []  # the segments of the processes before this one
        self.machine = dict(machine or {})
        self.started = time.time() if started is None else started
        self._start: float | None = None  # this epoch's start
        self._first_epoch: int | None = None
        self._epoch = 0
        self._device = "cpu"

    def on_fit_start(self, trainer, pl_module) -> None:  # before a resume restores the epoch
        device = pl_module.device
        self._device = (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                        else device.type)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch = trainer.current_epoch
        if self._first_epoch is None:
            self._first_epoch = self._epoch
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)

    def segment(self) -> dict:
        """This process's segment so far."""
        first = self._first_epoch if self._first_epoch is not None else self._epoch
        return {**self.machine, "device": self._device, "epochs": [first, self._epoch],
                "wall_s": time.time() - self.started}

    @property
    def segments(self) -> list[dict]:
        """Every process that trained the run, this one last (see the class docstring)."""
        return [*self.earlier, self.segment()]

    def state_dict(self) -> dict:
        return {"seconds": list(self.seconds), "segments": self.segments}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = [float(s) for s in state_dict.get("seconds", [])]
        self.earlier = list(state_dict.get("segments", []))
