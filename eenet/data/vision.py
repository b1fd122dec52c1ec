"""The small image benchmarks: scikit-learn's digits, MNIST, Fashion-MNIST, CIFAR-10/100, SVHN.

Each data set is one :class:`~eenet.data.registry.DatasetSpec` registered below
its loader. Before anything is read the files a data set needs are checked,
so a missing file is reported in one line that names the data set, the root
and the missing files, instead of a traceback from deep inside torchvision.
The checks follow what torchvision 0.29 itself requires:

- ``mnist`` / ``fashion_mnist``: the four uncompressed idx files under
  ``root/MNIST/raw`` (``root/FashionMNIST/raw``), or torchvision's legacy
  ``processed/training.pt`` + ``processed/test.pt``;
- ``cifar10``: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
- ``cifar100``: ``root/cifar-100-python/{train, test, meta}``;
- ``svhn``: ``root/train_32x32.mat`` or ``root/test_32x32.mat`` (one per split).

MNIST and Fashion-MNIST are read by torchvision's own classes. CIFAR and SVHN
are read here from the same on-disk files (python pickle batches, ``.mat``),
because torchvision refuses any file whose md5 differs from the official one;
pass ``verify_md5=True`` to get that check. Downloads (``download=True``) go
through torchvision's download code and its official URLs and checksums.

Normalisation: each record's ``mean``/``std`` (per channel, for pixels in
[0, 1]) is the data module's default and the value of the data set's config
in ``eenet/conf/dataset``; ``tests/test_data.py`` checks that the two agree.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from eenet.data.registry import (DatasetSpec, ensure_files, one_line, register_dataset,
                                 registered, root_path)
from eenet.errors import EENetError
from eenet.io import safe_pickle_load

__all__ = ["CIFAR10", "CIFAR100", "DIGITS", "FASHION_MNIST", "MNIST", "SVHN"]

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


def _tv_datasets():
    import torchvision.datasets as tvd

    return tvd


def _absent(base: Path, wanted: Iterable[str]) -> list[str]:
    return [rel for rel in wanted if not (base / rel).is_file()]


def _read_error(name: str, path: Path, error: BaseException) -> EENetError:
    return EENetError(f"could not read dataset '{name}' file {path}: "
                      f"{type(error).__name__}: {one_line(error)}")


# ----------------------------------------------------------------------------- digits


def _load_digits(root: object, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


DIGITS = register_dataset(DatasetSpec(
    name="digits", loader=_load_digits, num_classes=10, in_chans=1, size=(8, 8),
    mean=(0.3053,), std=(0.3760,), missing=None))


# ----------------------------------------------------------------------------- MNIST-like


def _mnist_missing(folder: str):
    def missing(base: Path, train: bool) -> list[str]:
        legacy = [base / folder / "processed" / f for f in ("training.pt", "test.pt")]
        if all(p.is_file() for p in legacy):
            return []
        # torchvision needs all four files, whichever split is asked for
        return _absent(base, [f"{folder}/raw/{f}" for f in _MNIST_FILES])

    return missing


def _mnist_like(name: str, class_name: str):
    def load(root: str | os.PathLike | None, train: bool,
             download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        spec = registered()[name]
        base = root_path(name, root)
        cls = getattr(_tv_datasets(), class_name)
        ensure_files(spec, base, train, download,
                     lambda: cls(str(base), train=train, download=True))
        try:
            ds = cls(str(base), train=train, download=False)
        except (AssertionError, RuntimeError, ValueError, OSError) as error:
            raise EENetError(f"could not read dataset '{name}' under {base}: "
                             f"{one_line(error)}") from error
        images = torch.as_tensor(ds.data, dtype=torch.uint8)
        if images.ndim != 3:
            raise EENetError(f"could not read dataset '{name}' under {base}: images have "
                             f"shape {tuple(images.shape)}, expected (N, H, W)")
        return images.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)

    load.__doc__ = f"torchvision ``{class_name}`` as uint8 (N, 1, 28, 28)."
    return load


MNIST = register_dataset(DatasetSpec(
    name="mnist", loader=_mnist_like("mnist", "MNIST"), num_classes=10, in_chans=1,
    size=(28, 28), mean=(0.1307,), std=(0.3081,), missing=_mnist_missing("MNIST"),
    downloadable=True))

FASHION_MNIST = register_dataset(DatasetSpec(
    name="fashion_mnist", loader=_mnist_like("fashion_mnist", "FashionMNIST"), num_classes=10,
    in_chans=1, size=(28, 28), mean=(0.2860,), std=(0.3530,),
    missing=_mnist_missing("FashionMNIST"), downloadable=True))


# ----------------------------------------------------------------------------- CIFAR


def _verify_md5(name: str, base: Path, files: Iterable[tuple[str, str]]) -> None:
    from torchvision.datasets.utils import check_integrity

    bad = [rel for rel, md5 in files if not check_integrity(str(base / rel), md5)]
    if bad:
        raise EENetError(f"dataset '{name}': md5 differs from the official one for "
                         f"{', '.join(bad)} under {base}; delete them and use download=true")


def _cifar_missing(folder: str, files: tuple[str, ...]):
    def missing(base: Path, train: bool) -> list[str]:
        return _absent(base, [f"{folder}/{f}" for f in files])

    return missing


def _cifar(name: str, class_name: str, folder: str, label_key: str):
    def load(root: str | os.PathLike | None, train: bool, download: bool,
             verify_md5: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        base = root_path(name, root)
        cls = getattr(_tv_datasets(), class_name)
        from torchvision.datasets.utils import download_and_extract_archive

        ensure_files(registered()[name], base, train, download,
                     lambda: download_and_extract_archive(cls.url, str(base),
                                                          filename=cls.filename, md5=cls.tgz_md5))
        if verify_md5:
            listed = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
            _verify_md5(name, base, [(f"{folder}/{f}", md5) for f, md5 in listed])
        batches = [f for f, _ in (cls.train_list if train else cls.test_list)]
        data, labels = [], []
        for batch in batches:
            path = base / folder / batch
            try:
                with open(path, "rb") as handle:
                    # numpy arrays and plain values only: the root is named by a
                    # config, and a run folder's config may come from someone else
                    entry = safe_pickle_load(handle, encoding="latin1")
                data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[label_key], dtype=np.int64).reshape(-1))
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError,
                    TypeError) as error:
                raise _read_error(name, path, error) from error
            if len(data[-1]) != len(labels[-1]):
                raise EENetError(f"could not read dataset '{name}' file {path}: "
                                 f"{len(data[-1])} images but {len(labels[-1])} labels")
        images = torch.from_numpy(np.concatenate(data))
        return images, torch.from_numpy(np.concatenate(labels))

    load.__doc__ = f"{class_name} python pickle batches as uint8 (N, 3, 32, 32)."
    return load


CIFAR10 = register_dataset(DatasetSpec(
    name="cifar10", loader=_cifar("cifar10", "CIFAR10", "cifar-10-batches-py", "labels"),
    num_classes=10, in_chans=3, size=(32, 32),
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), options=("verify_md5",),
    missing=_cifar_missing("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6))
                           + ("test_batch", "batches.meta")),
    downloadable=True))

CIFAR100 = register_dataset(DatasetSpec(
    name="cifar100", loader=_cifar("cifar100", "CIFAR100", "cifar-100-python", "fine_labels"),
    num_classes=100, in_chans=3, size=(32, 32),
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), options=("verify_md5",),
    missing=_cifar_missing("cifar-100-python", ("train", "test", "meta")), downloadable=True))


# ----------------------------------------------------------------------------- SVHN


def _svhn_file(train: bool) -> str:
    return "train_32x32.mat" if train else "test_32x32.mat"


def _load_svhn(root: str | os.PathLike | None, train: bool, download: bool,
               verify_md5: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN ``.mat`` files as uint8 (N, 3, 32, 32); label 10 (digit 0) becomes 0."""
    name = SVHN.name
    base = root_path(name, root)
    url, filename, md5 = _tv_datasets().SVHN.split_list["train" if train else "test"]

    def fetch() -> None:
        from torchvision.datasets.utils import download_url

        download_url(url, str(base), filename, md5)

    ensure_files(SVHN, base, train, download, fetch)
    if verify_md5:
        _verify_md5(name, base, [(filename, md5)])
    import scipy.io

    path = base / filename
    try:
        mat = scipy.io.loadmat(str(path))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as error:
        raise _read_error(name, path, error) from error
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


SVHN = register_dataset(DatasetSpec(
    name="svhn", loader=_load_svhn, num_classes=10, in_chans=3, size=(32, 32),
    mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), options=("verify_md5",),
    missing=lambda base, train: _absent(base, [_svhn_file(train)]), downloadable=True))
