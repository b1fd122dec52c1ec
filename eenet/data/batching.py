"""Batch-level normalisation and augmentation, and an in-memory dataset served by batches.

On a CPU, per-sample PIL or ``transforms.v2`` pipelines make training
data-loader bound. Here a whole batch of uint8 images is cropped, flipped and
normalised with a few tensor operations, and :class:`InMemoryBatchDataset`
returns a finished ``(x, y)`` batch for a LIST of indices, so that one Python
call builds one batch::

    loader = make_loader(InMemoryBatchDataset(images, labels, BatchTransform(mean, std)),
                         batch_size=128, shuffle=True)

Reproducible epochs: :class:`EpochBatchSampler` draws each epoch's order from
(seed, epoch) and gives every batch its own augmentation seed, so epoch e
yields the same batches however the run got there (straight through, or
killed and resumed from a checkpoint). Under DDP it gives rank r the samples
r, r+W, ... of every GLOBAL batch, and the augmentation is drawn for the whole
global batch, so W processes see exactly the batches one process would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from eenet.errors import EENetError

__all__ = ["AUGMENTATIONS", "BatchRequest", "BatchTransform", "EpochBatchSampler",
           "InMemoryBatchDataset", "make_loader", "to_float"]

#: Augmentation names accepted by :class:`BatchTransform`.
AUGMENTATIONS = ("crop", "hflip", "cutout")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 in 0..255 -> float32 in [0, 1]; floating tensors become float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not torch.is_floating_point(x):
        raise EENetError(f"images must be uint8 or floating point in [0, 1], got {x.dtype}")
    return x.to(torch.float32)


def _as_floats(values: Any, what: str) -> list[float]:
    if isinstance(values, (int, float)):
        values = [values]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise EENetError(f"{what} must be a list of numbers, got {values!r}") from None
    if not out:
        raise EENetError(f"{what} must hold one number per channel, got an empty list")
    return out


class BatchTransform:
    """Augment and normalise a whole batch ``(B, C, H, W)`` at once.

    Crop and flip run on the input (uint8 stays uint8, so padding is black),
    then the batch becomes float32 in [0, 1] and is normalised per channel with
    ``(x - mean) / std``; cutout then zeroes a square of the normalised image
    (the channel mean), as DeVries & Taylor apply it.

    Args:
        mean: per-channel mean (in [0, 1] units).
        std: per-channel standard deviation, all positive.
        augment: any of ``crop`` (zero-pad by ``crop_padding`` and take a random
            crop of the original size, an independent offset per sample) and
            ``hflip`` (flip each sample horizontally with probability 0.5) and
            ``cutout`` (DeVries & Taylor, "Improved Regularization of Convolutional
            Neural Networks with Cutout", 2017: a ``cutout_size`` square, centred on a
            uniformly drawn pixel of each sample and clipped at the border, set to zero
            after normalisation).
        crop_padding: padding for ``crop``, in pixels (>= 0).
        cutout_size: side of the ``cutout`` square, in pixels (>= 1); the paper's 16 for
            CIFAR-10 (8 for CIFAR-100, 20 for SVHN).
        generator: default random generator for the augmentations (the global
            torch RNG when ``None``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: Sequence[str] = (),
                 crop_padding: int = 4, generator: torch.Generator | None = None,
                 cutout_size: int = 16) -> None:
        mean_list = _as_floats(mean, "mean")
        std_list = _as_floats(std, "std")
        if len(mean_list) != len(std_list):
            raise EENetError(f"mean has {len(mean_list)} values but std has {len(std_list)}; "
                             f"give one of each per channel")
        if min(std_list) <= 0:
            raise EENetError(f"std values must be positive, got {std_list}")
        if isinstance(augment, str):
            augment = [augment]
        augment = [str(a) for a in augment]
        bad = [a for a in augment if a not in AUGMENTATIONS]
        if bad:
            raise EENetError(f"unknown augmentation(s) {', '.join(bad)}; accepted: "
                             f"{', '.join(AUGMENTATIONS)}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise EENetError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
        if isinstance(cutout_size, bool) or not isinstance(cutout_size, int) or cutout_size < 1:
            raise EENetError(f"cutout_size must be an integer >= 1, got {cutout_size!r}")
        self.mean_values = mean_list
        self.std_values = std_list
        self.augment = tuple(dict.fromkeys(augment))
        self.crop_padding = crop_padding
        self.cutout_size = cutout_size
        self.generator = generator
        self._mean = torch.tensor(mean_list, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std_list, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def channels(self) -> int:
        """Number of channels the mean and std are for."""
        return len(self.mean_values)

    def __repr__(self) -> str:
        return (f"BatchTransform(mean={self.mean_values}, std={self.std_values}, "
                f"augment={list(self.augment)}, crop_padding={self.crop_padding}, "
                f"cutout_size={self.cutout_size})")

    def sample_params(self, batch_size: int,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the random parameters of one batch.

        Returns:
            ``{"offsets": int64 (B, 2)}`` (top, left corner in the padded image) when
            ``crop`` is on, ``{"flip": bool (B,)}`` when ``hflip`` is on,
            ``{"cutout": float32 (B, 2)}`` (the square's centre, as a fraction of the height
            and width: row ``floor(f * H)``) when ``cutout`` is on. Each is drawn in that
            order, after the ones before it, so adding cutout leaves crops and flips as
            they were.
        """
        gen = generator if generator is not None else self.generator
        params: dict[str, torch.Tensor] = {}
        if "crop" in self.augment:
            params["offsets"] = torch.randint(0, 2 * self.crop_padding + 1, (batch_size, 2),
                                              generator=gen)
        if "hflip" in self.augment:
            params["flip"] = torch.rand(batch_size, generator=gen) < 0.5
        if "cutout" in self.augment:
            params["cutout"] = torch.rand(batch_size, 2, generator=gen)
        return params

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply given augmentation parameters, then normalise; see :meth:`sample_params`."""
        if x.ndim != 4:
            raise EENetError(f"BatchTransform expects a batch (B, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise EENetError(f"batch has {x.shape[1]} channels but mean/std have "
                             f"{self.channels} values")
        if "offsets" in params:
            x = self._crop(x, params["offsets"])
        if "flip" in params:
            flip = params["flip"].view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        x = (to_float(x) - self._mean) / self._std
        if "cutout" in params:
            x = self._cutout(x, params["cutout"])
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment (with fresh random parameters) and normalise a batch."""
        return self.apply(x, self.sample_params(x.shape[0], generator))

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        pad = self.crop_padding
        if pad == 0:
            return x
        b, c, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, 0:1] + torch.arange(h)  # (B, H)
        cols = offsets[:, 1:2] + torch.arange(w)  # (B, W)
        return padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                      rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]

    def _cutout(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows = (centres[:, 0] * h).long().clamp_(max=h - 1)
        cols = (centres[:, 1] * w).long().clamp_(max=w - 1)
        lo = self.cutout_size // 2  # the square covers [centre - lo, centre - lo + size)
        r = torch.arange(h).view(1, h) - (rows - lo).view(-1, 1)  # (B, H)
        c = torch.arange(w).view(1, w) - (cols - lo).view(-1, 1)  # (B, W)
        inside = ((r >= 0) & (r < self.cutout_size)).view(-1, 1, h, 1) & \
            ((c >= 0) & (c < self.cutout_size)).view(-1, 1, 1, w)
        return x.masked_fill(inside, 0.0)


class InMemoryBatchDataset(Dataset):
    """Images and labels in memory, indexed by a list of indices -> one finished batch.

    Use with ``DataLoader(ds, batch_size=None, sampler=BatchSampler(...))`` (see
    :func:`make_loader`). Works with worker processes: inside a worker the
    augmentations use that worker's own torch RNG (seeded by the DataLoader per
    worker and epoch), never a copy of ``generator``, so workers do not repeat
    each other's crops and flips.

    Args:
        images: ``(N, C, H, W)`` uint8, or float in [0, 1].
        labels: ``(N,)`` integer labels.
        transform: a :class:`BatchTransform` (or any callable ``(x, generator=...)``);
            without one the batch is only converted to float32 in [0, 1].
        generator: random generator for the augmentations in the main process.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: BatchTransform | None = None,
                 generator: torch.Generator | None = None) -> None:
        if images.ndim != 4:
            raise EENetError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise EENetError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.generator = generator

    def __len__(self) -> int:
        return len(self.images)

    def _request(self, req: "BatchRequest") -> tuple[torch.Tensor, torch.Tensor]:
        """A rank's share of a global batch; augmentation drawn for the whole global batch."""
        index = torch.as_tensor(req.indices, dtype=torch.int64)
        x, y = self.images[index], self.labels[index]
        if not isinstance(self.transform, BatchTransform):
            return (self.transform(x) if self.transform is not None else to_float(x)), y
        g = torch.Generator().manual_seed(req.seed)
        params = self.transform.sample_params(req.global_size, g)
        pos = torch.as_tensor(req.positions, dtype=torch.int64)
        return self.transform.apply(x, {k: v[pos] for k, v in params.items()}), y

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["generator"] = None  # workers use their own per-worker RNG
        return state

    def _rng(self) -> torch.Generator | None:
        if torch.utils.data.get_worker_info() is not None:
            return None
        return self.generator

    def __getitem__(self, indices: "BatchRequest | Sequence[int] | torch.Tensor | int"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(indices, BatchRequest):
            return self._request(indices)
        single = isinstance(indices, int)
        index = torch.as_tensor([indices] if single else indices, dtype=torch.int64)
        x, y = self.images[index], self.labels[index]
        x = self.transform(x, generator=self._rng()) if self.transform is not None else to_float(x)
        return (x[0], y[0]) if single else (x, y)


@dataclass
class BatchRequest:
    """One rank's share of a global batch.

    Attributes:
        indices: the samples of this rank.
        positions: their positions in the global batch.
        global_size: the global batch's size.
        seed: the augmentation seed of the global batch.
    """

    indices: list[int]
    positions: list[int]
    global_size: int
    seed: int


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochBatchSampler(Sampler):
    """Batches of indices whose order and augmentation depend only on (seed, epoch, batch).

    Args:
        n: data set size.
        batch_size: the GLOBAL batch size (summed over ranks).
        shuffle: a fresh permutation each epoch (else sequential).
        seed: base seed.
        drop_last: drop a last batch smaller than ``batch_size``.
        rank: this process's rank; world_size: number of processes. Rank r gets
            positions r, r + W, ... of every global batch.
        epoch_fn: returns the current epoch when iteration starts (e.g. the
            trainer's); otherwise the value of :meth:`set_epoch` is used.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, epoch_fn=None):
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.drop_last = int(seed), drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch_fn = epoch_fn
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _current_epoch(self) -> int:
        return int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self):
        epoch = self._current_epoch()
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        for b in range(len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            positions = list(range(self.rank, len(batch), self.world_size))
            yield BatchRequest(indices=batch[positions].tolist(), positions=positions,
                               global_size=len(batch), seed=_mix(self.seed, epoch, b))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False, generator: torch.Generator | None = None,
                seed: int | None = None, rank: int = 0, world_size: int = 1,
                epoch_fn=None) -> DataLoader:
    """A DataLoader that asks ``dataset`` for whole batches (lists of indices).

    Args:
        dataset: a dataset whose ``__getitem__`` takes a list of indices.
        batch_size: samples per batch (>= 1).
        shuffle: random order (``RandomSampler``) instead of sequential.
        num_workers: worker processes (persistent when > 0).
        drop_last: drop the last incomplete batch.
        generator: draws the base seed when ``seed`` is not given (the global torch
            RNG when ``None``), so ``seed_everything`` makes the order reproducible.
        seed: base seed of :class:`EpochBatchSampler` (order and augmentation).
        rank, world_size: this process's share of every global batch (DDP).
        epoch_fn: returns the current epoch (see :class:`EpochBatchSampler`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EENetError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise EENetError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed=seed, drop_last=drop_last,
                                rank=rank, world_size=world_size, epoch_fn=epoch_fn)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
