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
image-folder loader of :mod:`eenet.data.datasets`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from eenet.errors import EENetError

__all__ = ["NEGATIVE_FOLDERS", "VWW_CLASSES", "VWW_SOURCES", "load_vww", "missing_vww"]

#: Label order: 0 = no person, 1 = person.
VWW_CLASSES = ("no_person", "person")
#: Accepted names of the no-person folder.
NEGATIVE_FOLDERS = ("no_person", "non_person")
VWW_SOURCES = ("https://www.silabs.com/public/files/github/machine_learning/benchmarks/datasets/"
               "vw_coco2014_96.tar.gz (MLPerf Tiny's 96x96 copy) or build it from COCO 2014 "
               "with the Visual Wake Words script of tensorflow/models "
               "(research/slim/datasets/build_visualwakewords_data.py)")


def _negative_folder(split_dir: Path) -> str | None:
    found = [f for f in NEGATIVE_FOLDERS if (split_dir / f).is_dir()]
    return found[0] if len(found) == 1 else None


def missing_vww(root: str | os.PathLike) -> list[str]:
    """Class folders (relative to ``root``) absent from ``train/`` and ``test/``."""
    base = Path(root)
    missing = []
    for split in ("train", "test"):
        if not (base / split / "person").is_dir():
            missing.append(f"{split}/person/")
        if not any((base / split / f).is_dir() for f in NEGATIVE_FOLDERS):
            missing.append(f"{split}/no_person/")
    return missing


def load_vww(root: str | os.PathLike | None, train: bool, download: bool = False,
             image_size: Sequence[int] | None = (96, 96),
             max_per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual Wake Words as uint8 ``(N, 3, H, W)`` and labels (0 no person, 1 person).

    Args:
        image_size: ``(H, W)`` to resize to; ``None`` keeps the files' size
            (they must then all agree).
        max_per_class: keep only the first n files (sorted by name) of each class.
    """
    from eenet.data import datasets  # here, not at the top: datasets registers this loader

    name = "vww"
    if root is None or str(root) == "":
        raise EENetError(f"dataset '{name}' needs a root folder (root=...), got none")
    base = Path(root).expanduser()
    if download:
        raise EENetError(f"dataset '{name}' cannot be downloaded here (torchvision has no "
                         f"downloader for it); get {VWW_SOURCES}, and arrange it as "
                         f"{base}/{{train,test}}/{{person,no_person}}/")
    missing = missing_vww(base)
    if missing:
        raise EENetError(f"dataset '{name}': missing {', '.join(missing)} under {base}; this data "
                         f"set cannot be downloaded, get {VWW_SOURCES}")
    negatives = {split: _negative_folder(base / split) for split in ("train", "test")}
    for split, negative in negatives.items():
        if negative is None:
            raise EENetError(f"dataset '{name}': {base / split} holds both no_person/ and "
                             f"non_person/; keep one")
        extra = sorted(set(datasets._class_folders(base / split)) - {"person", negative})
        if extra:
            raise EENetError(f"dataset '{name}': unexpected folder(s) {', '.join(extra)} in "
                             f"{base / split}; accepted: person, {negative}")
    if negatives["train"] != negatives["test"]:
        raise EENetError(f"dataset '{name}': the no-person folder is {negatives['train']}/ in "
                         f"train but {negatives['test']}/ in test; use one name")
    try:
        return datasets._load_imagefolder(base, train, False, image_size=image_size,
                                          max_per_class=max_per_class, channels=3)
    except EENetError as error:
        raise EENetError(f"dataset '{name}': {error}") from error
