"""Data layer: a registered record per data set, batch transforms, the Lightning data module.

- :mod:`eenet.data.registry`: :class:`DatasetSpec`, one frozen record per data set
  (loader, options, classes, channels, size, normalisation, the missing-files
  check), registered beside its loader (:mod:`eenet.data.vision`,
  :mod:`eenet.data.imagefolder`, :mod:`eenet.data.vww`, :mod:`eenet.data.audio`);
- :mod:`eenet.data.datasets`: ``load_split(name, root, train)`` -> in-memory
  ``(images, labels)`` tensors, ``dataset_info``, ``missing_files``, ``list_datasets``,
  all read from the records;
- :mod:`eenet.data.batching`: :class:`BatchTransform` (crop / flip / normalise a
  whole uint8 batch) and :class:`InMemoryBatchDataset` (one call, one batch);
- :mod:`eenet.data.datamodule`: :class:`ClassificationDataModule` (train / val
  carved from the training split / the data set's own test split).
"""

from eenet.data.batching import (AUGMENTATIONS, BatchTransform, InMemoryBatchDataset,
                                 make_loader, to_float)
from eenet.data.datamodule import ClassificationDataModule
from eenet.data.datasets import (IMAGE_EXTENSIONS, dataset_info, get_dataset, list_datasets,
                                 load_split, missing_files)
from eenet.data.registry import DatasetSpec

__all__ = [
    "AUGMENTATIONS",
    "BatchTransform",
    "ClassificationDataModule",
    "DatasetSpec",
    "IMAGE_EXTENSIONS",
    "InMemoryBatchDataset",
    "dataset_info",
    "get_dataset",
    "list_datasets",
    "load_split",
    "make_loader",
    "missing_files",
    "to_float",
]
