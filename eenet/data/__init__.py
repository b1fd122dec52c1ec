"""Data layer: whole-split loaders, batch-level transforms and the Lightning data module.

- :mod:`eenet.data.datasets`: ``load_split(name, root, train)`` -> in-memory
  ``(images, labels)`` tensors, with one-line errors for missing files;
- :mod:`eenet.data.batching`: :class:`BatchTransform` (crop / flip / normalise a
  whole uint8 batch) and :class:`InMemoryBatchDataset` (one call, one batch);
- :mod:`eenet.data.datamodule`: :class:`ClassificationDataModule` (train / val
  carved from the training split / the data set's own test split).
"""

from eenet.data.batching import (AUGMENTATIONS, BatchTransform, InMemoryBatchDataset,
                                 make_loader, to_float)
from eenet.data.datamodule import ClassificationDataModule
from eenet.data.datasets import (DATASET_INFO, DATASETS, IMAGE_EXTENSIONS, dataset_info,
                                 list_datasets, load_split, missing_files)

__all__ = [
    "AUGMENTATIONS",
    "BatchTransform",
    "ClassificationDataModule",
    "DATASETS",
    "DATASET_INFO",
    "IMAGE_EXTENSIONS",
    "InMemoryBatchDataset",
    "dataset_info",
    "list_datasets",
    "load_split",
    "make_loader",
    "missing_files",
    "to_float",
]
