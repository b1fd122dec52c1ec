"""Whole-split image classification data sets, loaded into memory as tensors.

Every loader returns ``(images, labels)``: ``images`` a ``(N, C, H, W)`` tensor
(uint8 for every data set but ``digits``, whose 0..16 grey levels come back as
float32 in [0, 1], and the keyword-spotting sets, whose 1x49x10 MFCC images
are float32 on an int8 grid) and ``labels`` an int64 ``(N,)`` tensor.

Before anything is read the files a data set needs are checked, so a missing
file is reported in one line that names the data set, the root and the missing
files, instead of a traceback from deep inside torchvision. The checks follow
what torchvision 0.29 itself requires:

- ``mnist`` / ``fashion_mnist``: the four uncompressed idx files under
  ``root/MNIST/raw`` (``root/FashionMNIST/raw``), or torchvision's legacy
  ``processed/training.pt`` + ``processed/test.pt``;
- ``cifar10``: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
- ``cifar100``: ``root/cifar-100-python/{train, test, meta}``;
- ``svhn``: ``root/train_32x32.mat`` or ``root/test_32x32.mat`` (one per split);
- ``imagefolder``: ``root/train/<class>/*`` and ``root/test/<class>/*``;
- ``kws12_subset``, ``speech_commands``: see :mod:`eenet.data.audio`;
  ``vww``: see :mod:`eenet.data.vww`.

MNIST and Fashion-MNIST are read by torchvision's own classes. CIFAR and SVHN
are read here from the same on-disk files (python pickle batches, ``.mat``),
because torchvision refuses any file whose md5 differs from the official one;
pass ``verify_md5=True`` to get that check. Downloads (``download=True``) go
through torchvision's download code and its official URLs and checksums.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from eenet.data.audio import (load_kws12_subset, load_speech_commands, missing_kws12_subset,
                              missing_speech_commands)
from eenet.data.vww import load_vww, missing_vww
from eenet.errors import EENetError, unknown_name

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "IMAGE_EXTENSIONS",
    "dataset_info",
    "list_datasets",
    "load_split",
    "missing_files",
]

#: Static facts per data set; ``None`` where they depend on the files (imagefolder).
DATASET_INFO: dict[str, dict[str, Any]] = {
    "digits": {"num_classes": 10, "in_chans": 1, "size": (8, 8)},
    "mnist": {"num_classes": 10, "in_chans": 1, "size": (28, 28)},
    "fashion_mnist": {"num_classes": 10, "in_chans": 1, "size": (28, 28)},
    "cifar10": {"num_classes": 10, "in_chans": 3, "size": (32, 32)},
    "cifar100": {"num_classes": 100, "in_chans": 3, "size": (32, 32)},
    "svhn": {"num_classes": 10, "in_chans": 3, "size": (32, 32)},
    "imagefolder": {"num_classes": None, "in_chans": 3, "size": None},
    "kws12_subset": {"num_classes": 12, "in_chans": 1, "size": (49, 10),
                     "note": "small real subset (1,000 clips of MLPerf Tiny's evaluation set), "
                             "not the full Speech Commands; fixed stratified 70/30 split"},
    "speech_commands": {"num_classes": 12, "in_chans": 1, "size": (49, 10)},
    "vww": {"num_classes": 2, "in_chans": 3, "size": (96, 96)},
}

#: File name endings that count as images in an image folder (as torchvision's ImageFolder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


# ----------------------------------------------------------------------------- helpers


def _root_path(name: str, root: str | os.PathLike | None) -> Path:
    if root is None or str(root) == "":
        raise EENetError(f"dataset '{name}' needs a root folder (root=...), got none")
    return Path(root).expanduser()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _raise_missing(name: str, root: Path, missing: Sequence[str], downloadable: bool) -> None:
    if not missing:
        return
    hint = ("; download=true fetches them" if downloadable
            else "; this data set cannot be downloaded, put the files there")
    raise EENetError(f"dataset '{name}': missing {', '.join(missing)} under {root}{hint}")


def _tv_datasets():
    import torchvision.datasets as tvd

    return tvd


def _download(name: str, fetch: Callable[[], Any]) -> None:
    """Run a torchvision download, turning network failures into one-line errors."""
    try:
        fetch()
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
        raise EENetError(f"could not download dataset '{name}': {_one_line(error)}") from error


def _ensure_files(name: str, base: Path, train: bool, download: bool,
                  fetch: Callable[[], Any]) -> None:
    """Fail fast naming the missing files, or download them (``fetch``) and check again."""
    missing = missing_files(name, base, train)
    if not missing:
        return
    if not download:
        _raise_missing(name, base, missing, downloadable=True)
    _download(name, fetch)
    still = missing_files(name, base, train)
    if still:
        _raise_missing(name, base, still, downloadable=True)


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
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if name == "digits":
        return []
    base = _root_path(name, root)
    if name in ("mnist", "fashion_mnist"):
        folder = "MNIST" if name == "mnist" else "FashionMNIST"
        legacy = [base / folder / "processed" / f for f in ("training.pt", "test.pt")]
        if all(p.is_file() for p in legacy):
            return []
        wanted = [f"{folder}/raw/{f}" for f in _MNIST_FILES]
    elif name == "cifar10":
        wanted = [f"cifar-10-batches-py/{f}" for f in _CIFAR10_FILES]
    elif name == "cifar100":
        wanted = [f"cifar-100-python/{f}" for f in _CIFAR100_FILES]
    elif name == "svhn":
        wanted = ["train_32x32.mat" if train else "test_32x32.mat"]
    elif name == "kws12_subset":
        return missing_kws12_subset(base)
    elif name == "speech_commands":
        return missing_speech_commands(base)
    elif name == "vww":
        return missing_vww(base)
    else:  # imagefolder
        missing = []
        for split in ("train", "test"):
            folder = base / split
            if not folder.is_dir():
                missing.append(f"{split}/")
            elif not any(p.is_dir() for p in folder.iterdir()):
                missing.append(f"{split}/<class>/ (no class folders)")
        return missing
    return [rel for rel in wanted if not (base / rel).is_file()]


# ----------------------------------------------------------------------------- loaders


def _load_digits(root: Any, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits with a fixed stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=_DIGITS_TEST_FRACTION, stratify=y,
        random_state=_DIGITS_SPLIT_SEED)
    idx = np.sort(train_idx if train else test_idx)
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)[idx] / 16.0)
    return images.unsqueeze(1).contiguous(), torch.from_numpy(y[idx])


def _mnist_like(name: str, class_name: str):
    def load(root: str | os.PathLike | None, train: bool,
             download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        base = _root_path(name, root)
        cls = getattr(_tv_datasets(), class_name)
        _ensure_files(name, base, train, download,
                      lambda: cls(str(base), train=train, download=True))
        try:
            ds = cls(str(base), train=train, download=False)
        except (AssertionError, RuntimeError, ValueError, OSError) as error:
            raise EENetError(f"could not read dataset '{name}' under {base}: "
                             f"{_one_line(error)}") from error
        images = torch.as_tensor(ds.data, dtype=torch.uint8)
        if images.ndim != 3:
            raise EENetError(f"could not read dataset '{name}' under {base}: images have "
                             f"shape {tuple(images.shape)}, expected (N, H, W)")
        return images.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)

    load.__doc__ = f"torchvision ``{class_name}`` as uint8 (N, 1, 28, 28)."
    return load


def _verify_md5(name: str, base: Path, files: Iterable[tuple[str, str]]) -> None:
    from torchvision.datasets.utils import check_integrity

    bad = [rel for rel, md5 in files if not check_integrity(str(base / rel), md5)]
    if bad:
        raise EENetError(f"dataset '{name}': md5 differs from the official one for "
                         f"{', '.join(bad)} under {base}; delete them and use download=true")


def _cifar(name: str, class_name: str, folder: str, label_key: str):
    def load(root: str | os.PathLike | None, train: bool, download: bool,
             verify_md5: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        base = _root_path(name, root)
        cls = getattr(_tv_datasets(), class_name)
        from torchvision.datasets.utils import download_and_extract_archive

        _ensure_files(name, base, train, download, lambda: download_and_extract_archive(
            cls.url, str(base), filename=cls.filename, md5=cls.tgz_md5))
        if verify_md5:
            listed = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
            _verify_md5(name, base, [(f"{folder}/{f}", md5) for f, md5 in listed])
        batches = [f for f, _ in (cls.train_list if train else cls.test_list)]
        data, labels = [], []
        for batch in batches:
            path = base / folder / batch
            try:
                with open(path, "rb") as handle:
                    entry = pickle.load(handle, encoding="latin1")
                data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[label_key], dtype=np.int64).reshape(-1))
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError,
                    TypeError) as error:
                raise EENetError(f"could not read dataset '{name}' file {path}: "
                                 f"{type(error).__name__}: {_one_line(error)}") from error
            if len(data[-1]) != len(labels[-1]):
                raise EENetError(f"could not read dataset '{name}' file {path}: "
                                 f"{len(data[-1])} images but {len(labels[-1])} labels")
        images = torch.from_numpy(np.concatenate(data))
        return images, torch.from_numpy(np.concatenate(labels))

    load.__doc__ = f"{class_name} python pickle batches as uint8 (N, 3, 32, 32)."
    return load


def _load_svhn(root: str | os.PathLike | None, train: bool, download: bool,
               verify_md5: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN ``.mat`` files as uint8 (N, 3, 32, 32); label 10 (digit 0) becomes 0."""
    name = "svhn"
    base = _root_path(name, root)
    split = "train" if train else "test"
    url, filename, md5 = _tv_datasets().SVHN.split_list[split]
    if missing_files(name, base, train):
        if not download:
            _raise_missing(name, base, [filename], downloadable=True)
        from torchvision.datasets.utils import download_url

        _download(name, lambda: download_url(url, str(base), filename, md5))
        _raise_missing(name, base, missing_files(name, base, train), downloadable=True)
    if verify_md5:
        _verify_md5(name, base, [(filename, md5)])
    import scipy.io

    path = base / filename
    try:
        mat = scipy.io.loadmat(str(path))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as error:
        raise EENetError(f"could not read dataset '{name}' file {path}: "
                         f"{type(error).__name__}: {_one_line(error)}") from error
    if x.ndim != 4 or x.shape[2] != 3:
        raise EENetError(f"could not read dataset '{name}' file {path}: X has shape {x.shape}, "
                         f"expected (32, 32, 3, N)")
    labels = y.astype(np.int64).reshape(-1)
    if len(labels) != x.shape[3]:
        raise EENetError(f"could not read dataset '{name}' file {path}: "
                         f"{x.shape[3]} images but {len(labels)} labels")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)), dtype=np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels)


# ----------------------------------------------------------------------------- image folder


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _image_files(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))


def _pil_decode(path: str, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise EENetError(f"could not decode image {path}: {_one_line(error)}") from error
    tensor = torch.from_numpy(array.copy())
    return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor.unsqueeze(0)


def _decode_all(paths: Sequence[str], channels: int) -> list[torch.Tensor]:
    """Image files as uint8 (C, H, W) tensors.

    torchvision's C++ decoders (``decode_jpeg`` for JPEG, ``decode_image`` for PNG,
    GIF, WebP) are about 4x faster than PIL on small images; PIL decodes what they
    cannot (BMP, TIFF, PPM, ...) and is the only path if torchvision's decoders
    are unavailable (they are deprecated in favour of TorchCodec since 0.29).
    """
    import warnings

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
            with open(path, "rb") as handle:
                raw = handle.read()
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


def _load_imagefolder(root: str | os.PathLike | None, train: bool, download: bool,
                      image_size: Sequence[int] | None = None, max_per_class: int | None = None,
                      channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``root/{train,test}/<class>/*`` into uint8 (N, C, H, W).

    Class indices follow the sorted class folder names of ``root/train`` for both
    splits (torchvision's ImageFolder convention), so train and test agree.

    Args:
        image_size: ``(H, W)`` to resize every image to (antialiased bilinear);
            required when the images differ in size.
        max_per_class: keep only the first n files (sorted by name) of each class.
        channels: 3 (RGB) or 1 (grey); images are converted as needed.
    """
    name = "imagefolder"
    base = _root_path(name, root)
    if download:
        raise EENetError("dataset 'imagefolder' cannot be downloaded; use download=false and "
                         "put images in root/train/<class>/ and root/test/<class>/")
    if channels not in (1, 3):
        raise EENetError(f"imagefolder option channels={channels} is not accepted; accepted: 1, 3")
    if max_per_class is not None and (isinstance(max_per_class, bool)
                                      or not isinstance(max_per_class, int) or max_per_class < 1):
        raise EENetError(f"imagefolder option max_per_class={max_per_class!r} must be a "
                         f"positive integer or null")
    size = None
    if image_size is not None:
        size = tuple(int(s) for s in image_size)
        if len(size) != 2 or min(size) < 1:
            raise EENetError(f"imagefolder option image_size={list(image_size)} must be two "
                             f"positive integers [H, W]")
    _raise_missing(name, base, missing_files(name, base, train), downloadable=False)

    classes = _class_folders(base / "train")
    split_dir = base / ("train" if train else "test")
    extra = sorted(set(_class_folders(split_dir)) - set(classes))
    if extra:
        raise EENetError(f"imagefolder: class folder(s) {', '.join(extra)} in {split_dir} are not "
                         f"in {base / 'train'}; the test classes must be train classes")
    paths: list[str] = []
    labels: list[int] = []
    for index, cls in enumerate(classes):
        folder = split_dir / cls
        files = _image_files(folder) if folder.is_dir() else []
        if not files and train:
            raise EENetError(f"imagefolder: class folder {folder} holds no image file; accepted "
                             f"endings: {', '.join(IMAGE_EXTENSIONS)}")
        if max_per_class is not None:
            files = files[:max_per_class]
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([index] * len(files))
    if not paths:
        raise EENetError(f"imagefolder: no image file under {split_dir}/<class>/; accepted "
                         f"endings: {', '.join(IMAGE_EXTENSIONS)}")

    images = _decode_all(paths, channels)
    if size is None:
        first = images[0].shape[1:]
        for path, image in zip(paths, images):
            if image.shape[1:] != first:
                raise EENetError(
                    f"imagefolder images differ in size ({first[0]}x{first[1]} in {paths[0]}, "
                    f"{image.shape[1]}x{image.shape[2]} in {path}); set image_size=[H, W] to "
                    f"resize them")
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
    from torchvision.transforms.v2 import functional as TF

    out = torch.empty((len(images), channels, *size), dtype=torch.uint8)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape[1:]), []).append(i)
    for shape, members in by_shape.items():
        group = torch.stack([images[i] for i in members])
        if shape != size:
            group = TF.resize(group, list(size), antialias=True)
        out[torch.tensor(members)] = group
    return out, torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------- registry

#: name -> loader ``(root, train, download, **options) -> (images, labels)``.
DATASETS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "digits": _load_digits,
    "mnist": _mnist_like("mnist", "MNIST"),
    "fashion_mnist": _mnist_like("fashion_mnist", "FashionMNIST"),
    "cifar10": _cifar("cifar10", "CIFAR10", "cifar-10-batches-py", "labels"),
    "cifar100": _cifar("cifar100", "CIFAR100", "cifar-100-python", "fine_labels"),
    "svhn": _load_svhn,
    "imagefolder": _load_imagefolder,
    "kws12_subset": load_kws12_subset,
    "speech_commands": load_speech_commands,
    "vww": load_vww,
}

_OPTIONS: dict[str, tuple[str, ...]] = {
    "cifar10": ("verify_md5",),
    "cifar100": ("verify_md5",),
    "svhn": ("verify_md5",),
    "imagefolder": ("image_size", "max_per_class", "channels"),
    "kws12_subset": ("features",),
    "speech_commands": ("max_per_class", "quantize", "drop_validation_list"),
    "vww": ("image_size", "max_per_class"),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_split`, sorted."""
    return sorted(DATASETS)


def _check_options(name: str, options: dict[str, Any]) -> None:
    accepted = _OPTIONS.get(name, ())
    bad = sorted(set(options) - set(accepted))
    if bad:
        raise EENetError(f"dataset '{name}' does not take option(s) {', '.join(bad)}; accepted: "
                         f"{', '.join(accepted) if accepted else 'none'}")


def load_split(name: str, root: str | os.PathLike | None, train: bool, download: bool = False,
               **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one whole split of a data set into memory.

    Args:
        name: one of :func:`list_datasets`.
        root: the data folder (ignored by ``digits``).
        train: the training split if true, else the test split.
        download: fetch missing files with torchvision (needs network); when false,
            missing files raise :class:`EENetError` before torchvision is called.
        **options: per data set: ``verify_md5`` (cifar10, cifar100, svhn);
            ``image_size``, ``max_per_class``, ``channels`` (imagefolder); ``features``
            (kws12_subset); ``max_per_class``, ``quantize``, ``drop_validation_list``
            (speech_commands); ``image_size``, ``max_per_class`` (vww).

    Returns:
        ``(images, labels)``: images ``(N, C, H, W)`` uint8 (float32 in [0, 1] for
        ``digits``; float32 MFCC for ``kws12_subset``, ``speech_commands``), labels int64 ``(N,)``.

    Raises:
        EENetError: unknown name or option, missing or unreadable files, failed download.
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    _check_options(name, options)
    return DATASETS[name](root, bool(train), bool(download), **options)


def dataset_info(name: str, root: str | os.PathLike | None = None,
                 **options: Any) -> dict[str, Any]:
    """``{"num_classes", "in_chans", "size"}`` for a data set, without loading images.

    For ``imagefolder`` the class count comes from the class folders of
    ``root/train`` (``None`` if that folder is absent), ``in_chans`` from the
    ``channels`` option and ``size`` from ``image_size`` (``None`` when not given:
    the images decide).
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    _check_options(name, options)
    info = dict(DATASET_INFO[name])
    if name == "imagefolder":
        train_dir = Path(root).expanduser() / "train" if root else None
        info["num_classes"] = (len(_class_folders(train_dir))
                               if train_dir is not None and train_dir.is_dir() else None)
        info["in_chans"] = int(options.get("channels", 3))
        size = options.get("image_size")
        info["size"] = tuple(int(s) for s in size) if size is not None else None
    return info
