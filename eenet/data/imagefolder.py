"""Image folders (``root/{train,test}/<class>/*``) decoded into one uint8 tensor per split.

The generic reader behind the ``imagefolder`` data set and Visual Wake Words
(:mod:`eenet.data.vww`). It follows torchvision's ``ImageFolder`` conventions:
class indices are the positions of the sorted class folder names of
``root/train`` (for both splits, so train and test agree), files are taken in
sorted name order, and the accepted endings are :data:`IMAGE_EXTENSIONS`.
Unlike ``ImageFolder``, both splits are checked together whichever is loaded
(:func:`image_folder_classes`): ``train/`` and ``test/`` must hold the same
class folders, none of them empty, so a test split that lacks a class (an
accuracy over the other classes) is refused before training, not found after.

Decoding only what is kept: the file list and its labels are known from the
folder names before any image is decoded, so when the caller keeps a subset
of the split (``select``, see :func:`eenet.data.load_split`) only those files
are decoded. The result is the same tensors as decoding every file and then
indexing: every image is decoded, and resized when ``image_size`` is given,
on its own.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from eenet.data.registry import (DatasetSpec, Select, check_selection, one_line,
                                 register_dataset, require_files, root_path)
from eenet.errors import EENetError

__all__ = ["IMAGE_EXTENSIONS", "class_folders", "decode_images", "image_files",
           "image_folder_classes", "list_image_folder", "load_image_folder", "missing_image_folder"]

#: File name endings that count as images in an image folder (as torchvision's ImageFolder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def class_folders(folder: Path) -> list[str]:
    """Names of the sub-folders of ``folder``, sorted."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def image_files(folder: Path) -> list[str]:
    """Names of the image files (:data:`IMAGE_EXTENSIONS`) in ``folder``, sorted."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))


def _holds_an_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
                   for entry in entries)


def _refuse_empty(split_dir: Path, classes: Sequence[str]) -> None:
    empty = [c for c in classes if not _holds_an_image(split_dir / c)]
    if empty:
        raise EENetError(f"imagefolder: class folder(s) {', '.join(empty)} of {split_dir} hold no "
                         f"image file; accepted endings: {', '.join(IMAGE_EXTENSIONS)}")


def image_folder_classes(base: Path) -> tuple[list[str], Path]:
    """The class folder names of ``base/train`` (sorted) and that folder, checked against ``base/test``.

    Both splits must hold the same class folders, and every one of them at
    least one image file; otherwise one line names the classes missing where.
    """
    train_dir, test_dir = base / "train", base / "test"
    classes = class_folders(train_dir)
    _refuse_empty(train_dir, classes)
    tested = class_folders(test_dir)
    only_train = [c for c in classes if c not in tested]
    only_test = [c for c in tested if c not in classes]
    if only_train or only_test:
        where = ([f"{', '.join(only_train)} missing from {test_dir}"] if only_train else []) + (
            [f"{', '.join(only_test)} in {test_dir} but not in {train_dir}"] if only_test else [])
        raise EENetError(f"imagefolder: train/ and test/ must hold the same class folders: "
                         f"class folder(s) {'; '.join(where)}")
    _refuse_empty(test_dir, classes)
    return classes, train_dir


def missing_image_folder(base: Path, train: bool = True) -> list[str]:
    """The parts of ``base/{train,test}/<class>/`` that are absent (both splits, always)."""
    missing = []
    for split in ("train", "test"):
        folder = base / split
        if not folder.is_dir():
            found_val = split == "test" and (base / "val").is_dir()
            missing.append("test/ (there is a val/: this layout is train/ and test/, rename it)"
                           if found_val else f"{split}/")
        elif not any(p.is_dir() for p in folder.iterdir()):
            missing.append(f"{split}/<class>/ (no class folders)")
    return missing


# ----------------------------------------------------------------------------- decoding


def _pil_decode(path: str, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise EENetError(f"could not decode image {path}: {one_line(error)}") from error
    tensor = torch.from_numpy(array.copy())
    return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor.unsqueeze(0)


def decode_images(paths: Sequence[str], channels: int) -> list[torch.Tensor]:
    """Image files as uint8 ``(C, H, W)`` tensors, one per path, in order.

    torchvision's C++ decoders (``decode_jpeg`` for JPEG, ``decode_image`` for PNG,
    GIF, WebP) are about 4x faster than PIL on small images; PIL decodes what they
    cannot (BMP, TIFF, PPM, ...) and is the only path if torchvision's decoders
    are unavailable (they are deprecated in favour of TorchCodec since 0.29).
    """
    try:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    except ImportError:  # pragma: no cover - future torchvision without image decoders
        return [_pil_decode(p, channels) for p in paths]
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    raw = handle.read()
            except OSError as error:
                raise EENetError(f"could not read image {path}: {one_line(error)}") from error
            data = torch.frombuffer(raw, dtype=torch.uint8) if raw else None
            try:
                if data is None:
                    raise ValueError("empty file")
                if raw[:2] == b"\xff\xd8":
                    image = decode_jpeg(data, mode=mode)
                else:
                    image = decode_image(data, mode=mode)
                if image.dtype != torch.uint8:  # 16-bit PNG
                    raise ValueError("not 8-bit")
            except (RuntimeError, ValueError):
                image = _pil_decode(path, channels)
            images.append(image)
    return images


def _stack(images: list[torch.Tensor], paths: Sequence[str], channels: int,
           size: tuple[int, int] | None) -> torch.Tensor:
    """One uint8 ``(N, C, H, W)`` tensor; each image resized to ``size`` on its own when given."""
    if size is None:
        first = images[0].shape[1:]
        for path, image in zip(paths, images):
            if image.shape[1:] != first:
                raise EENetError(
                    f"imagefolder images differ in size ({first[0]}x{first[1]} in {paths[0]}, "
                    f"{image.shape[1]}x{image.shape[2]} in {path}); set image_size=[H, W] to "
                    f"resize them")
        return torch.stack(images)
    from torchvision.transforms.v2 import functional as TF

    out = torch.empty((len(images), channels, *size), dtype=torch.uint8)
    for i, image in enumerate(images):
        # antialiased bilinear, one image at a time: the result of an image does not depend
        # on which other images are decoded with it (a subset gives the same tensors)
        out[i] = image if tuple(image.shape[1:]) == size else TF.resize(
            image, list(size), antialias=True)
    return out


# ----------------------------------------------------------------------------- the loader


def list_image_folder(base: Path, train: bool,
                      max_per_class: int | None = None) -> tuple[list[str], list[int]]:
    """The files of one split and their labels, without decoding anything.

    Class indices follow the sorted class folder names of ``base/train``; both
    splits must hold the same class folders, none empty (:func:`image_folder_classes`).
    ``max_per_class`` keeps the first n files (sorted by name) of each class.
    """
    classes, _ = image_folder_classes(base)
    split_dir = base / ("train" if train else "test")
    paths: list[str] = []
    labels: list[int] = []
    for index, cls in enumerate(classes):
        folder = split_dir / cls
        files = image_files(folder)
        if not files:  # emptied since image_folder_classes looked
            raise EENetError(f"imagefolder: class folder {folder} holds no image file; accepted "
                             f"endings: {', '.join(IMAGE_EXTENSIONS)}")
        if max_per_class is not None:
            files = files[:max_per_class]
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([index] * len(files))
    if not paths:
        raise EENetError(f"imagefolder: no image file under {split_dir}/<class>/; accepted "
                         f"endings: {', '.join(IMAGE_EXTENSIONS)}")
    return paths, labels


def _check_image_size(image_size: Sequence[int] | None, what: str) -> tuple[int, int] | None:
    if image_size is None:
        return None
    try:
        size = tuple(int(s) for s in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise EENetError(f"{what} option image_size={image_size!r} must be two positive "
                         f"integers [H, W]")
    return size  # type: ignore[return-value]


def load_image_folder(root: str | os.PathLike | None, train: bool, download: bool = False,
                      image_size: Sequence[int] | None = None, max_per_class: int | None = None,
                      channels: int = 3,
                      select: Select | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``root/{train,test}/<class>/*`` into uint8 ``(N, C, H, W)`` and int64 labels.

    Args:
        image_size: ``(H, W)`` to resize every image to (antialiased bilinear);
            required when the images differ in size.
        max_per_class: keep only the first n files (sorted by name) of each class.
        channels: 3 (RGB) or 1 (grey); images are converted as needed.
        select: ``select(n)`` -> positions to keep of the split's n files (in
            :func:`list_image_folder` order); only those files are decoded, and
            the result equals the full split indexed at those positions.
    """
    base = root_path(IMAGEFOLDER.name, root)
    if download:
        raise EENetError("dataset 'imagefolder' cannot be downloaded; use download=false and "
                         "put images in root/train/<class>/ and root/test/<class>/")
    if channels not in (1, 3):
        raise EENetError(f"imagefolder option channels={channels} is not accepted; accepted: 1, 3")
    if max_per_class is not None and (isinstance(max_per_class, bool)
                                      or not isinstance(max_per_class, int) or max_per_class < 1):
        raise EENetError(f"imagefolder option max_per_class={max_per_class!r} must be a "
                         f"positive integer or null")
    size = _check_image_size(image_size, "imagefolder")
    require_files(IMAGEFOLDER, base, train)
    paths, labels = list_image_folder(base, train, max_per_class)
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    if select is not None:
        keep = check_selection(select, len(paths))
        paths = [paths[i] for i in keep.tolist()]
        label_tensor = label_tensor[keep]
        if not paths:
            return (torch.empty((0, channels, *(size or (0, 0))), dtype=torch.uint8),
                    label_tensor)
    return _stack(decode_images(paths, channels), paths, channels, size), label_tensor


def _imagefolder_info(root: str | os.PathLike | None,
                      options: Mapping[str, Any]) -> dict[str, Any]:
    """Classes from the folders of ``root/train`` (None if absent); channels, size from options."""
    train_dir = Path(root).expanduser() / "train" if root else None
    size = options.get("image_size")
    return {
        "num_classes": (len(class_folders(train_dir))
                        if train_dir is not None and train_dir.is_dir() else None),
        "in_chans": int(options.get("channels", 3)),
        "size": tuple(int(s) for s in size) if size is not None else None,
    }


IMAGEFOLDER = register_dataset(DatasetSpec(
    name="imagefolder", loader=load_image_folder, num_classes=None, in_chans=3, size=None,
    mean=None, std=None, options=("image_size", "max_per_class", "channels"),
    missing=missing_image_folder, downloadable=False, find_classes=image_folder_classes,
    decodes_subset=True, resolve_info=_imagefolder_info))
