"""Whole-split data sets, loaded into memory as tensors: the questions asked of the registry.

Every data set is one :class:`~eenet.data.registry.DatasetSpec` record,
registered beside its loader:

- :mod:`eenet.data.vision`: ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
  ``cifar100``, ``svhn``;
- :mod:`eenet.data.imagefolder`: ``imagefolder`` (``root/{train,test}/<class>/*``);
- :mod:`eenet.data.vww`: ``vww`` (Visual Wake Words);
- :mod:`eenet.data.audio`: ``kws12_subset``, ``speech_commands`` (keyword spotting).

This module imports those modules (which registers them) and answers from
their records: :func:`load_split`, :func:`dataset_info`, :func:`list_datasets`,
:func:`missing_files`, :func:`get_dataset`. The loaders import only
:mod:`eenet.data.registry`, never this module, so there is no import cycle.

Every loader returns ``(images, labels)``: ``images`` a ``(N, C, H, W)`` tensor
(uint8 for every data set but ``digits``, whose 0..16 grey levels come back as
float32 in [0, 1], and the keyword-spotting sets, whose 1x49x10 MFCC images
are float32 on an int8 grid) and ``labels`` an int64 ``(N,)`` tensor. Before
anything is read the files a data set needs are checked, so a missing file
is reported in one line naming the data set, the root and the missing files;
given the configured ``num_classes``, :func:`load_split` checks it against the
data set's classes before anything is read, and the loaded labels against it
(:func:`~eenet.data.registry.check_num_classes`,
:func:`~eenet.data.registry.check_labels`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from eenet.data import audio, imagefolder, vision, vww  # noqa: F401  (they register the records)
from eenet.data.imagefolder import IMAGE_EXTENSIONS
from eenet.data.registry import (DatasetSpec, Select, check_labels, check_num_classes,
                                 check_selection, registered, root_path)
from eenet.errors import EENetError, unknown_name

__all__ = [
    "IMAGE_EXTENSIONS",
    "dataset_info",
    "get_dataset",
    "list_datasets",
    "load_split",
    "missing_files",
]


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_split`, sorted."""
    return sorted(registered())


def get_dataset(name: str) -> DatasetSpec:
    """The registered record of data set ``name`` (one-line error for an unknown name)."""
    specs = registered()
    if name not in specs:
        raise unknown_name("dataset", name, specs)
    return specs[name]


def _check_options(spec: DatasetSpec, options: dict[str, Any]) -> None:
    bad = sorted(set(options) - set(spec.options))
    if bad:
        raise EENetError(f"dataset '{spec.name}' does not take option(s) {', '.join(bad)}; "
                         f"accepted: {', '.join(spec.options) if spec.options else 'none'}")


def missing_files(name: str, root: str | os.PathLike | None, train: bool = True) -> list[str]:
    """Files (relative to ``root``) that ``name`` needs and that are absent.

    Args:
        name: a registered data set name.
        root: the data folder.
        train: which split is wanted (only ``svhn`` needs one file per split).

    Returns:
        The missing paths, relative to ``root``; empty when everything is there.
        Always empty for ``digits``.
    """
    spec = get_dataset(name)
    if spec.missing is None:
        return []
    return spec.missing(root_path(name, root), bool(train))


def load_split(name: str, root: str | os.PathLike | None, train: bool, download: bool = False,
               select: Select | None = None, num_classes: int | None = None,
               **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one whole split of a data set into memory, or the samples ``select`` keeps.

    Args:
        name: one of :func:`list_datasets`.
        root: the data folder (ignored by ``digits``).
        train: the training split if true, else the test split.
        download: fetch missing files with torchvision (needs network); when false,
            missing files raise :class:`EENetError` before torchvision is called.
        select: ``select(n)`` -> 1-D integer positions into the split's n samples;
            the result is then exactly ``images[positions], labels[positions]`` of
            the whole split. Image folders (``imagefolder``, ``vww``) learn n and the
            labels from the file list and decode only the chosen files; the other
            data sets load the split and index it.
        num_classes: the class count the network is built for (``dataset.num_classes``);
            checked before anything is read against the record's fixed count, or the
            class folders an image folder holds (which must agree across splits).
            Either way the loaded labels must lie in ``0..num_classes-1``. ``None``:
            only the record's own count (when fixed) bounds the labels.
        **options: per data set: ``verify_md5`` (cifar10, cifar100, svhn);
            ``image_size``, ``max_per_class``, ``channels`` (imagefolder); ``features``
            (kws12_subset); ``max_per_class``, ``quantize``, ``drop_validation_list``
            (speech_commands); ``image_size``, ``max_per_class`` (vww).

    Returns:
        ``(images, labels)``: images ``(N, C, H, W)`` uint8 (float32 in [0, 1] for
        ``digits``; float32 MFCC for ``kws12_subset``, ``speech_commands``), labels int64 ``(N,)``.

    Raises:
        EENetError: unknown name or option, missing or unreadable files, failed download,
            a selection outside the split, ``num_classes`` other than the data set's,
            labels outside ``0..num_classes-1``.
    """
    spec = get_dataset(name)
    _check_options(spec, options)
    count = check_num_classes(spec, root, num_classes)
    if select is not None and spec.decodes_subset:
        images, labels = spec.loader(root, bool(train), bool(download), select=select, **options)
    else:
        images, labels = spec.loader(root, bool(train), bool(download), **options)
        if select is not None:
            keep = check_selection(select, len(labels))
            images, labels = images[keep], labels[keep]
    check_labels(spec, root, labels, count)
    return images, labels


def dataset_info(name: str, root: str | os.PathLike | None = None,
                 **options: Any) -> dict[str, Any]:
    """``{"num_classes", "in_chans", "size"}`` for a data set, without loading images.

    ``"note"`` is added for a data set that carries a caveat (``kws12_subset``).
    For ``imagefolder`` the class count comes from the class folders of
    ``root/train`` (``None`` if that folder is absent), ``in_chans`` from the
    ``channels`` option and ``size`` from ``image_size`` (``None`` when not given:
    the images decide); for ``vww`` ``size`` follows ``image_size`` when given.
    """
    spec = get_dataset(name)
    _check_options(spec, options)
    info: dict[str, Any] = {"num_classes": spec.num_classes, "in_chans": spec.in_chans,
                            "size": spec.size}
    if spec.note is not None:
        info["note"] = spec.note
    if spec.resolve_info is not None:
        if root is not None and spec.missing is not None:
            root_path(name, root)  # a loop, a file, an unreadable folder: one line, not a traceback
        info.update(spec.resolve_info(root, options))
    return info
