"""The Lightning data module for image classification: train / val / test from one data set.

The validation split is carved out of the data set's TRAINING split with a
fixed permutation (``split_seed``), gets no augmentation and never overlaps the
training samples; it is the split for model selection and exit-threshold
calibration, so it holds at least one sample and leaves at least one for
training (checked with the actual sizes when the split is carved). The test
split is the data set's own test split and is only ever evaluated, never tuned
on.

Every constructor argument is a plain value, so Hydra can build the module
from YAML::

    _target_: eenet.data.ClassificationDataModule
    name: cifar10
    root: ../shared/data
    num_classes: 10
    mean: [0.4914, 0.4822, 0.4465]
    std: [0.2470, 0.2435, 0.2616]
    augment: [crop, hflip]
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from eenet.data.batching import BatchTransform, InMemoryBatchDataset, make_loader
from eenet.data.datasets import dataset_info, get_dataset, list_datasets, load_split, missing_files
from eenet.errors import EENetError

__all__ = ["ClassificationDataModule"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_count(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise EENetError(f"{what} must be a positive integer or null, got {value!r}")
    return int(value)


def _fixed_permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class _Chosen:
    """A ``select`` for :func:`load_split` that remembers the split size it was asked about."""

    def __init__(self, choose) -> None:
        self.choose = choose
        self.n: int | None = None

    def __call__(self, n: int) -> torch.Tensor:
        self.n = n
        return self.choose(n)


class ClassificationDataModule(L.LightningDataModule):
    """Train / val / test loaders over an in-memory classification data set.

    Args:
        name: a data set of :func:`eenet.data.list_datasets`.
        root: its data folder (ignored by ``digits``).
        download: let torchvision fetch missing files (needs network).
        mean: per-channel normalisation mean, one value per channel; ``None``
            takes the data set record's (:func:`eenet.data.get_dataset`).
        std: per-channel normalisation standard deviation; ``None`` as ``mean``.
        augment: training augmentations, any of ``crop``, ``hflip`` and ``cutout``
            (:class:`eenet.data.BatchTransform`).
        crop_padding: zero padding, in pixels, before the random ``crop`` (4 suits
            32x32 images; the 8x8 digits use 1).
        cutout_size: side of the ``cutout`` square in pixels (16 for CIFAR-10, as
            DeVries & Taylor 2017); used only with ``cutout`` in ``augment``.
        num_classes: the class count the network is built for (the dataset
            config passes ``${dataset.num_classes}``); checked where the data is
            loaded against the data set's fixed count or its class folders, and
            the labels against it (:func:`eenet.data.load_split`). ``None``: not
            checked.
        val_size: validation samples taken from the training split: a fraction in
            (0, 1) or a count (1 <= count < training size); either way at least
            one sample goes to each of val and train.
        split_seed: seed of the fixed permutations (validation split, subsets).
        batch_size: training batch size.
        eval_batch_size: validation / test batch size (``batch_size`` when null).
        num_workers: DataLoader worker processes.
        train_subset: keep only n samples of the training split (the first n of a
            fixed permutation with ``split_seed``), before the validation split is
            carved from them; for quick runs. Image folders decode only those n
            files (the same samples as decoding all, then choosing).
        test_subset: keep only n test samples, chosen the same way.
        image_size: ``[H, W]`` to resize images to (data sets with an
            ``image_size`` option: ``imagefolder``, ``vww``).
        drop_last: drop the last training batch when it is smaller than ``batch_size``.

    Shuffling and augmentation of the training batches use the global torch RNG
    (per worker when ``num_workers > 0``), so ``lightning.seed_everything`` makes
    them reproducible.
    """

    def __init__(self, name: str, root: str | None = None, download: bool = False, *,
                 num_classes: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None,
                 augment: Sequence[str] = (),
                 crop_padding: int = 4, cutout_size: int = 16,
                 val_size: float | int = 0.1, split_seed: int = 0,
                 batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0,
                 train_subset: int | None = None, test_subset: int | None = None,
                 image_size: Sequence[int] | None = None, drop_last: bool = False) -> None:
        super().__init__()
        name = str(name)
        spec = get_dataset(name)
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
            raise EENetError(f"val_size must be a fraction in (0, 1) or a sample count, "
                             f"got {val_size!r}")
        if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
            raise EENetError(f"val_size={val_size} is out of range; give a fraction in (0, 1) "
                             f"or an integer count smaller than the training split")
        if _is_int(val_size) and val_size < 1:
            raise EENetError(f"val_size={val_size} is out of range: the validation split picks "
                             f"the checkpoint and calibrates the exits, so it needs samples; give "
                             f"a fraction in (0, 1) or an integer count >= 1 smaller than the "
                             f"training split")
        if not _is_int(batch_size) or batch_size < 1:
            raise EENetError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if eval_batch_size is not None and (not _is_int(eval_batch_size) or eval_batch_size < 1):
            raise EENetError(f"eval_batch_size must be an integer >= 1 or null, "
                             f"got {eval_batch_size!r}")
        if not _is_int(num_workers) or num_workers < 0:
            raise EENetError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not _is_int(split_seed):
            raise EENetError(f"split_seed must be an integer, got {split_seed!r}")
        self.options: dict[str, Any] = {}
        if image_size is not None:
            if "image_size" not in spec.options:
                resizing = [n for n in list_datasets() if "image_size" in get_dataset(n).options]
                raise EENetError(f"image_size is only accepted for dataset(s) "
                                 f"{', '.join(resizing)}, not '{name}'")
            size = [int(s) for s in image_size]
            if len(size) != 2 or min(size) < 1:
                raise EENetError(f"image_size must be two positive integers [H, W], "
                                 f"got {list(image_size)}")
            self.options["image_size"] = size

        self.name = name
        self.root = None if root is None else str(root)
        self.configured_classes = _optional_count(num_classes, "num_classes")
        self.download = bool(download)
        self.augment = [str(a) for a in ([augment] if isinstance(augment, str) else augment)]
        self.val_size = val_size
        self.split_seed = int(split_seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else None
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.train_subset = _optional_count(train_subset, "train_subset")
        self.test_subset = _optional_count(test_subset, "test_subset")
        if mean is None or std is None:
            if mean is not None or std is not None:
                raise EENetError("give both mean and std, or neither (the data set's own)")
            if spec.mean is None:
                raise EENetError(f"dataset '{name}' has no standard normalisation; give mean "
                                 f"and std (one value per channel)")
            mean, std = list(spec.mean), list(spec.std)  # type: ignore[arg-type]
        # Validates mean/std lengths against each other and the augmentation names.
        self.train_transform = BatchTransform(mean, std, self.augment, crop_padding=crop_padding,
                                              cutout_size=cutout_size)
        self.eval_transform = BatchTransform(mean, std, ())
        self.mean = self.train_transform.mean_values
        self.std = self.train_transform.std_values
        self._info = dataset_info(name, self.root, **self.options)
        if self._info["in_chans"] is not None:
            self._check_channels(self._info["in_chans"])

        self._train: InMemoryBatchDataset | None = None
        self._val: InMemoryBatchDataset | None = None
        self._test: InMemoryBatchDataset | None = None
        #: Positions in the data set's training split of the train / val samples, and of the
        #: kept test samples (set by :meth:`setup`).
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None
        self.test_indices: torch.Tensor | None = None
        self.load_count = 0  # how many splits were read from disk (setup caches them)

    # ------------------------------------------------------------------ checks and loading

    def _check_channels(self, channels: int) -> None:
        if len(self.mean) != channels:
            raise EENetError(f"dataset '{self.name}' has {channels} channel(s) but mean/std have "
                             f"{len(self.mean)} values; give one value per channel")

    def _load(self, train: bool, select=None) -> tuple[torch.Tensor, torch.Tensor]:
        self.load_count += 1
        images, labels = load_split(self.name, self.root, train, self.download, select=select,
                                    num_classes=self.configured_classes, **self.options)
        self._check_channels(images.shape[1])
        return images, labels

    def _val_count(self, n_train: int) -> int:
        """Validation samples out of ``n_train``: at least one, leaving at least one to train on."""
        split = (f"a training split of {n_train} sample(s)"
                 + (f" (train_subset={self.train_subset})" if self.train_subset is not None else "")
                 + f" of dataset '{self.name}'")
        if n_train < 2:
            raise EENetError(f"{split} cannot give both a validation and a training sample; "
                             f"val_size={self.val_size} needs a training split of at least 2")
        if isinstance(self.val_size, float):
            return min(max(int(round(self.val_size * n_train)), 1), n_train - 1)
        count = int(self.val_size)
        if count >= n_train:
            raise EENetError(f"val_size={self.val_size} is out of range for {split}: it would "
                             f"leave no sample to train on; give a count below {n_train} or a "
                             f"fraction in (0, 1)")
        return count

    def prepare_data(self) -> None:
        """Check that the files are there (downloading them if ``download``); loads nothing."""
        if get_dataset(self.name).missing is None:
            return
        for train in (True, False):
            if missing_files(self.name, self.root, train):
                load_split(self.name, self.root, train, self.download,
                           num_classes=self.configured_classes, **self.options)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits a stage needs, once (later calls reuse them).

        ``fit`` / ``validate`` load the training split (train + val), ``test`` /
        ``predict`` the test split, ``None`` both. With ``train_subset`` /
        ``test_subset`` only the kept samples are asked for (``select`` of
        :func:`load_split`): image folders decode only those files.
        """
        if stage in (None, "fit", "validate") and self._train is None:
            if self.train_subset is None:
                images, labels = self._load(train=True)
                order, kept = self._train_order(len(labels)), None
            else:
                chosen = _Chosen(lambda n: self._train_order(n).sort().values)
                images, labels = self._load(train=True, select=chosen)
                order = self._train_order(chosen.n)  # type: ignore[arg-type]
                kept = order.sort().values  # the split positions of the loaded rows
            n_val = self._val_count(len(order))
            val_idx = order[:n_val].sort().values
            train_idx = order[n_val:].sort().values
            rows = (lambda idx: idx) if kept is None else (
                lambda idx: torch.searchsorted(kept, idx))
            self._train = InMemoryBatchDataset(images[rows(train_idx)], labels[rows(train_idx)],
                                               self.train_transform)
            self._val = InMemoryBatchDataset(images[rows(val_idx)], labels[rows(val_idx)],
                                             self.eval_transform)
            self.train_indices, self.val_indices = train_idx, val_idx
        if stage in (None, "test", "predict") and self._test is None:
            if self.test_subset is None:
                images, labels = self._load(train=False)
                idx = torch.arange(len(labels))
            else:
                chosen = _Chosen(self._test_positions)
                images, labels = self._load(train=False, select=chosen)
                idx = self._test_positions(chosen.n)  # type: ignore[arg-type]
            self._test = InMemoryBatchDataset(images, labels, self.eval_transform)
            self.test_indices = idx

    def _train_order(self, n: int) -> torch.Tensor:
        """The training split's fixed permutation cut to ``train_subset`` (val, then train)."""
        order = _fixed_permutation(n, self.split_seed)
        if self.train_subset is not None and self.train_subset < n:
            order = order[:self.train_subset]
        return order

    def _test_positions(self, n: int) -> torch.Tensor:
        """Kept test positions, sorted: all, or the first ``test_subset`` of a fixed permutation."""
        if self.test_subset is not None and self.test_subset < n:
            return _fixed_permutation(n, self.split_seed)[:self.test_subset].sort().values
        return torch.arange(n)

    # ------------------------------------------------------------------ loaders

    def _datasets(self, which: str) -> InMemoryBatchDataset:
        if which == "test":
            self.setup("test")
            assert self._test is not None
            return self._test
        self.setup("fit")
        return self._train if which == "train" else self._val  # type: ignore[return-value]

    @property
    def train_dataset(self) -> InMemoryBatchDataset:
        """The training samples (augmented), loading them if needed."""
        return self._datasets("train")

    @property
    def val_dataset(self) -> InMemoryBatchDataset:
        """The validation samples (carved from the training split, not augmented)."""
        return self._datasets("val")

    @property
    def test_dataset(self) -> InMemoryBatchDataset:
        """The data set's own test split (not augmented)."""
        return self._datasets("test")

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        """A loader for this process: under DDP its share of every global batch.

        The order and augmentation of epoch e depend only on (run seed, e): the
        run's seed is ``lightning.seed_everything``'s (``PL_GLOBAL_SEED``), the
        epoch is read from the trainer when an epoch's iteration starts.
        """
        trainer = getattr(self, "trainer", None)
        rank, world, epoch_fn = 0, 1, None
        if trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
            epoch_fn = lambda: trainer.current_epoch  # noqa: E731
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.split_seed))
        return make_loader(dataset, batch_size, shuffle=shuffle, num_workers=self.num_workers,
                           drop_last=drop_last, seed=seed, rank=rank, world_size=world,
                           epoch_fn=epoch_fn)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches (``batch_size`` is the global batch)."""
        return self._loader(self.train_dataset, self.batch_size, True, self.drop_last)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, no augmentation."""
        return self._loader(self.val_dataset, self.eval_batch_size or self.batch_size, False,
                            False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order, no augmentation."""
        return self._loader(self.test_dataset, self.eval_batch_size or self.batch_size, False,
                            False)

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader`."""
        return self.test_dataloader()

    # ------------------------------------------------------------------ facts

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the model input (loads the training split if the files decide it)."""
        if self._train is None and self._info["size"] is not None:
            return (int(self._info["in_chans"]), *map(int, self._info["size"]))
        return tuple(int(s) for s in self.train_dataset.images.shape[1:])  # type: ignore

    @property
    def value_range(self) -> tuple[float, float] | None:
        """``(low, high)`` of the input values before normalisation, or ``None`` (unbounded)."""
        return get_dataset(self.name).value_range

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        if self._info["num_classes"] is not None:
            return int(self._info["num_classes"])
        self._info = dataset_info(self.name, self.root, **self.options)
        if self._info["num_classes"] is None:
            self.setup("fit")  # reports the missing folders in one line
            self._info["num_classes"] = int(self.train_dataset.labels.max()) + 1
        return int(self._info["num_classes"])

    @property
    def split_sizes(self) -> dict[str, int]:
        """``{"train": n, "val": n, "test": n}`` (loads the splits if needed)."""
        return {"train": len(self.train_dataset), "val": len(self.val_dataset),
                "test": len(self.test_dataset)}

    def describe(self) -> dict[str, Any]:
        """Plain-value summary for results files (loads the splits if needed)."""
        return {
            "name": self.name,
            "root": self.root,
            "sizes": self.split_sizes,
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "augment": list(self.augment),
            "val_size": self.val_size,
            "split_seed": self.split_seed,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
            **({"image_size": list(self.options["image_size"])}
               if "image_size" in self.options else {}),
        }
