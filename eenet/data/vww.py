"""Visual Wake Words: is there a person in the image? Two classes, 96x96 RGB.

Chowdhery et al., "Visual Wake Words Dataset", arXiv:1906.05721, 2019 (COCO
2014 images labelled ``person`` when a person box covers at least 0.5% of the
image; MLPerf Tiny's copy uses 2.5%). It is the Visual Wake Words benchmark of
Banbury et al., "MLPerf Tiny Benchmark", NeurIPS Datasets and Benchmarks 2021,
whose reference model is MobileNetV1 0.25x at 96x96
(:func:`eenet.models.mlperf_tiny.mobilenet_v1_vww`).

Layout under ``root`` (an image folder with fixed classes)::

    root/train/person/*.jpg      root/train/no_person/*.jpg
    root/test/person/*.jpg       root/test/no_person/*.jpg

``non_person`` is accepted instead of ``no_person``: it is the folder name in
MLPerf Tiny's ``vw_coco2014_96.tar.gz``, which holds one folder per class and
no split (move a held-out part of each folder to ``root/test/<class>/``).
Labels: 0 for no person, 1 for person (alphabetical folder order, as Keras'
``flow_from_directory`` in the reference). Images are decoded and resized
(antialiased bilinear, 96x96 unless ``image_size`` says otherwise) by the
image-folder reader of :mod:`eenet.data.imagefolder`, which decodes only the
files a subset keeps. Normalisation: mean 0, std 1 (pixels / 255 only, as
MLPerf Tiny's reference preprocessing, ``rescale=1/255``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from eenet.data.imagefolder import class_folders, load_image_folder
from eenet.data.registry import (DatasetSpec, Select, register_dataset, require_files,
                                 root_path)
from eenet.errors import EENetError

__all__ = ["NEGATIVE_FOLDERS", "VWW", "VWW_CLASSES", "VWW_SOURCES", "load_vww", "missing_vww"]

#: Label order: 0 = no person, 1 = person.
VWW_CLASSES = ("no_person", "person")
#: Accepted names of the no-person folder.
NEGATIVE_FOLDERS = ("no_person", "non_person")
VWW_SOURCES = ("https://www.silabs.com/public/files/github/machine_learning/benchmarks/datasets/"
               "vw_coco2014_96.tar.gz (MLPerf Tiny's 96x96 copy) or build it from COCO 2014 "
               "with the Visual Wake Words script of tensorflow/models "
               "(research/slim/datasets/build_visualwakewords_data.py)")
_SIZE = (96, 96)


def _negative_folder(split_dir: Path) -> str | None:
    found = [f for f in NEGATIVE_FOLDERS if (split_dir / f).is_dir()]
    return found[0] if len(found) == 1 else None


def missing_vww(root: str | os.PathLike, train: bool = True) -> list[str]:
    """Class folders (relative to ``root``) absent from ``train/`` and ``test/`` (both, always)."""
    base = Path(root)
    missing = []
    for split in ("train", "test"):
        if not (base / split / "person").is_dir():
            missing.append(f"{split}/person/")
        if not any((base / split / f).is_dir() for f in NEGATIVE_FOLDERS):
            missing.append(f"{split}/no_person/")
    return missing


def load_vww(root: str | os.PathLike | None, train: bool, download: bool = False,
             image_size: Sequence[int] | None = _SIZE, max_per_class: int | None = None,
             select: Select | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual Wake Words as uint8 ``(N, 3, H, W)`` and labels (0 no person, 1 person).

    Args:
        image_size: ``(H, W)`` to resize to; ``None`` keeps the files' size
            (they must then all agree).
        max_per_class: keep only the first n files (sorted by name) of each class.
        select: positions to keep of the split (see
            :func:`eenet.data.imagefolder.load_image_folder`); only those files are decoded.
    """
    name = VWW.name
    base = root_path(name, root)
    if download:
        raise EENetError(f"dataset '{name}' cannot be downloaded here (torchvision has no "
                         f"downloader for it); get {VWW_SOURCES}, and arrange it as "
                         f"{base}/{{train,test}}/{{person,no_person}}/")
    require_files(VWW, base, train)
    negatives = {split: _negative_folder(base / split) for split in ("train", "test")}
    for split, negative in negatives.items():
        if negative is None:
            raise EENetError(f"dataset '{name}': {base / split} holds both no_person/ and "
                             f"non_person/; keep one")
        extra = sorted(set(class_folders(base / split)) - {"person", negative})
        if extra:
            raise EENetError(f"dataset '{name}': unexpected folder(s) {', '.join(extra)} in "
                             f"{base / split}; accepted: person, {negative}")
    if negatives["train"] != negatives["test"]:
        raise EENetError(f"dataset '{name}': the no-person folder is {negatives['train']}/ in "
                         f"train but {negatives['test']}/ in test; use one name")
    try:
        return load_image_folder(base, train, False, image_size=image_size,
                                 max_per_class=max_per_class, channels=3, select=select)
    except EENetError as error:
        raise EENetError(f"dataset '{name}': {error}") from error


def _vww_info(root: str | os.PathLike | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """``image_size`` given: the images come out that size (``None``: the files decide)."""
    if "image_size" not in options:
        return {}
    size = options["image_size"]
    return {"size": tuple(int(s) for s in size) if size is not None else None}


VWW = register_dataset(DatasetSpec(
    name="vww", loader=load_vww, num_classes=len(VWW_CLASSES), in_chans=3, size=_SIZE,
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), options=("image_size", "max_per_class"),
    missing=missing_vww, downloadable=False, how_to_get=f"get {VWW_SOURCES}",
    decodes_subset=True, resolve_info=_vww_info))
