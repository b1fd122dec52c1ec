"""Tests of the data layer (``eenet.data``): loaders, batch transforms, the data module.

Data sets that are not on this machine are tested on small files written in the data
set's own on-disk format (idx, python pickle batches, ``.mat``, PNG and JPEG class
folders; the writers are in ``tests/small_data.py``). MNIST and the CIFAR-10 JPEG
folder are read from conftest's ``data_root``: the real files from ``../shared/data``
when present (then their published facts are checked too), small ones otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from small_data import (CIFAR10_CLASSES, write_cifar10, write_cifar100, write_imagefolder,
                        write_mnist, write_svhn)

from eenet.data import (AUGMENTATIONS, BatchTransform, ClassificationDataModule, DatasetSpec,
                        InMemoryBatchDataset, dataset_info, get_dataset, list_datasets,
                        load_split, make_loader, missing_files, to_float)
from eenet.errors import EENetError

DIGITS_MEAN, DIGITS_STD = [0.3053], [0.3760]


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    assert message.strip() == message and message
    return message


# ----------------------------------------------------------------------------- registry


CONF_DATASETS = Path(__file__).resolve().parents[1] / "eenet" / "conf" / "dataset"


def test_registry_names_and_info():
    assert list_datasets() == sorted(["digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
                                      "svhn", "imagefolder", "kws12_subset", "speech_commands",
                                      "vww"])
    assert dataset_info("cifar100") == {"num_classes": 100, "in_chans": 3, "size": (32, 32)}
    assert dataset_info("mnist")["in_chans"] == 1
    spec = get_dataset("cifar10")
    assert isinstance(spec, DatasetSpec) and spec.name == "cifar10" and spec.downloadable
    assert spec.options == ("verify_md5",) and len(spec.mean) == len(spec.std) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_classes = 3  # type: ignore[misc]
    with pytest.raises(EENetError) as err:
        get_dataset("imagenet")
    assert "unknown dataset 'imagenet'" in assert_one_line(err)


def test_registry_one_record_per_config():
    """Every config of eenet/conf/dataset names a record whose facts it repeats exactly."""
    from omegaconf import OmegaConf

    configs = sorted(CONF_DATASETS.glob("*.yaml"))
    assert len(configs) >= 10
    used = set()
    for path in configs:
        cfg = OmegaConf.load(path)
        spec = get_dataset(cfg.datamodule.name)
        used.add(spec.name)
        where = f"{path.name} vs the '{spec.name}' record"
        if spec.num_classes is not None:
            assert cfg.num_classes == spec.num_classes, where
        assert cfg.in_chans == spec.in_chans, where
        if spec.size is not None:
            assert tuple(cfg.image_size) == spec.size, where
        if spec.mean is not None:  # imagefolder has none: its configs set their own
            assert tuple(cfg.datamodule.mean) == spec.mean, where
            assert tuple(cfg.datamodule.std) == spec.std, where
        assert len(cfg.datamodule.mean) == len(cfg.datamodule.std) == cfg.in_chans, where
    # and every record is reachable from a config
    assert used == set(list_datasets())


def test_registry_rejects_a_second_record_of_a_name():
    from eenet.data.registry import register_dataset

    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(dataclasses.replace(get_dataset("digits")))
    with pytest.raises(ValueError, match="normalisation values"):
        dataclasses.replace(get_dataset("digits"), mean=(0.5, 0.5), std=(0.2, 0.2))


def test_unknown_name_and_option():
    with pytest.raises(EENetError) as err:
        load_split("imagenet", "/nowhere", True)
    message = assert_one_line(err)
    assert "unknown dataset 'imagenet'" in message and "cifar10" in message and "svhn" in message
    with pytest.raises(EENetError) as err:
        load_split("mnist", "/nowhere", True, image_size=(8, 8))
    message = assert_one_line(err)
    assert "image_size" in message and "none" in message


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_values():
    x_train, y_train = load_split("digits", None, train=True)
    x_test, y_test = load_split("digits", "ignored/root", train=False)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    # the values are the 0..16 grey levels divided by 16
    assert torch.equal(torch.round(x_train * 16), x_train * 16)
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())


def test_digits_test_split_fixed_disjoint_stratified():
    from sklearn.datasets import load_digits

    x_test1, y_test1 = load_split("digits", None, train=False)
    torch.manual_seed(123)  # the run seed must not matter
    x_test2, y_test2 = load_split("digits", None, train=False)
    assert torch.equal(x_test1, x_test2) and torch.equal(y_test1, y_test2)
    x_train, y_train = load_split("digits", None, train=True)

    full = load_digits()
    rows = lambda x, y: collections.Counter(  # noqa: E731
        (int(label),) + tuple((image.reshape(-1) * 16).round().int().tolist())
        for image, label in zip(x, y))
    expected = collections.Counter(
        (int(label),) + tuple(int(v) for v in image.reshape(-1))
        for image, label in zip(full.images, full.target))
    # train and test together are exactly the 1797 images: a partition, nothing shared
    assert rows(x_train, y_train) + rows(x_test1, y_test1) == expected
    per_class = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(y_test1.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1), test_counts


# ----------------------------------------------------------------------------- generated files


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_idx_files(tmp_path, name, folder):
    written = write_mnist(tmp_path, folder, n_train=12, n_test=7)
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_split(name, str(tmp_path), train=train)
        assert images.shape == (len(written[prefix][0]), 1, 28, 28)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert np.array_equal(images[:, 0].numpy(), written[prefix][0])
        assert np.array_equal(labels.numpy(), written[prefix][1].astype(np.int64))


def test_cifar10_pickle_batches(tmp_path):
    written = write_cifar10(tmp_path, per_batch=4)
    images, labels = load_split("cifar10", tmp_path, train=True)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert np.array_equal(images.numpy().reshape(20, 3072), written["train"][0])
    assert labels.tolist() == written["train"][1].tolist()
    # channel order: the first 1024 bytes of a row are the red plane, row-major
    assert images[0, 0, 0, 1] == written["train"][0][0, 1]
    assert images[0, 1, 0, 0] == written["train"][0][0, 1024]
    images, labels = load_split("cifar10", tmp_path, train=False)
    assert images.shape == (4, 3, 32, 32)
    assert np.array_equal(images.numpy().reshape(4, 3072), written["test"][0])
    assert labels.tolist() == written["test"][1].tolist()


def test_cifar100_fine_labels(tmp_path):
    written = write_cifar100(tmp_path)
    for train, split in ((True, "train"), (False, "test")):
        images, labels = load_split("cifar100", tmp_path, train=train)
        data, fine = written[split]
        assert images.shape == (len(data), 3, 32, 32)
        assert np.array_equal(images.numpy().reshape(len(data), -1), data)
        assert labels.tolist() == fine.tolist()


def test_cifar_verify_md5_rejects_non_official_files(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(EENetError) as err:
        load_split("cifar10", tmp_path, train=True, verify_md5=True)
    message = assert_one_line(err)
    assert "md5" in message and "data_batch_1" in message


def test_svhn_mat_files(tmp_path):
    written = write_svhn(tmp_path)
    for train, split in ((True, "train"), (False, "test")):
        images, labels = load_split("svhn", tmp_path, train=train)
        x, digits = written[split]
        assert images.shape == (x.shape[3], 3, 32, 32) and images.dtype == torch.uint8
        assert np.array_equal(images.numpy(), np.transpose(x, (3, 2, 0, 1)))
        assert labels.tolist() == digits.tolist()  # label 10 came back as digit 0
        assert labels.min() == 0 and labels.max() <= 9


def test_imagefolder_png_exact(tmp_path):
    written = write_imagefolder(tmp_path, classes=("cat", "ant", "bee"), per_class=3)
    for train, split in ((True, "train"), (False, "test")):
        images, labels = load_split("imagefolder", tmp_path, train=train)
        arrays, expected = written[split]
        assert images.shape == (9, 3, 6, 5) and images.dtype == torch.uint8
        assert labels.tolist() == expected == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ant, bee, cat
        for image, array in zip(images, arrays):
            assert np.array_equal(image.permute(1, 2, 0).numpy(), array)
    info = dataset_info("imagefolder", tmp_path)
    assert info == {"num_classes": 3, "in_chans": 3, "size": None}


def test_imagefolder_grey_limit_and_jpeg(tmp_path):
    written = write_imagefolder(tmp_path / "grey", mode="L", per_class=4)
    images, labels = load_split("imagefolder", tmp_path / "grey", train=True, channels=1,
                                max_per_class=2)
    assert images.shape == (6, 1, 6, 5) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(images[2, 0].numpy(), written["train"][0][4])  # class 1, first file
    rgb, _ = load_split("imagefolder", tmp_path / "grey", train=True, max_per_class=1)
    assert rgb.shape == (3, 3, 6, 5) and torch.equal(rgb[:, 0], rgb[:, 1])


def test_imagefolder_jpeg_decodes_each_file_to_its_own_image(tmp_path):
    """JPEG is lossy, so the decoded pixels are compared with an independent decoder and with
    every original: each image must lie nearer its own original than half the distance to any
    other. (Uniform noise is no test: JPEG moves it ~50 grey levels, two noise images differ
    by ~85, so "within 80 of the original" held for another file's pixels too.)"""
    from PIL import Image

    written = write_imagefolder(tmp_path, ext="jpg", per_class=2, sizes=[(16, 16)], smooth=True)
    originals = [a.astype(np.int64) for a in written["test"][0]]
    images, labels = load_split("imagefolder", tmp_path, train=False)
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    files = sorted(tmp_path.glob("test/*/*.jpg"))  # loading order: class folder, then file name
    distance = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731  mean absolute difference
    for i, (image, path) in enumerate(zip(images, files)):
        decoded = image.permute(1, 2, 0).numpy().astype(np.int64)
        # PIL (libjpeg-turbo, default integer IDCT and fancy upsampling, as torchvision's
        # decode_jpeg) gives exactly these pixels
        with Image.open(path) as pil:
            assert np.array_equal(decoded, np.asarray(pil.convert("RGB"))), path
        own = distance(decoded, originals[i])
        for j, other in enumerate(originals):
            if j != i:
                # if own < d(O_i, O_j) / 2, the triangle inequality puts every other original
                # further away than own: the file holds image i, not a swapped or garbled one
                assert own < distance(originals[i], other) / 2, (path, j, own)


def test_imagefolder_sizes(tmp_path):
    write_imagefolder(tmp_path, sizes=[(6, 5), (9, 7)])
    with pytest.raises(EENetError) as err:
        load_split("imagefolder", tmp_path, train=True)
    message = assert_one_line(err)
    assert "differ in size" in message and "image_size" in message
    images, labels = load_split("imagefolder", tmp_path, train=True, image_size=(8, 4))
    assert images.shape == (9, 3, 8, 4) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagefolder_bad_layouts(tmp_path):
    write_imagefolder(tmp_path / "a")
    (tmp_path / "a" / "test" / "zebra").mkdir()
    with pytest.raises(EENetError) as err:
        load_split("imagefolder", tmp_path / "a", train=False)
    assert "zebra" in assert_one_line(err)
    write_imagefolder(tmp_path / "b")
    (tmp_path / "b" / "train" / "empty").mkdir()
    with pytest.raises(EENetError) as err:
        load_split("imagefolder", tmp_path / "b", train=True)
    assert "empty" in assert_one_line(err) and "no image" in str(err.value)
    with pytest.raises(EENetError, match="cannot be downloaded"):
        load_split("imagefolder", tmp_path / "a", train=True, download=True)


# ----------------------------------------------------------------------------- subsets


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Every image file the image-folder reader decodes, in order."""
    import eenet.data.imagefolder as imagefolder

    seen: list[str] = []
    real = imagefolder.decode_images

    def counting(paths, channels):
        seen.extend(paths)
        return real(paths, channels)

    monkeypatch.setattr(imagefolder, "decode_images", counting)
    return seen


def test_imagefolder_select_decodes_only_the_kept_files(tmp_path, decoded):
    # mixed sizes resized to 7x6, two formats: the subset must equal the full decode indexed
    write_imagefolder(tmp_path / "png", sizes=[(6, 5), (9, 7), (7, 6)], per_class=5)
    write_imagefolder(tmp_path / "jpg", sizes=[(16, 12), (10, 10)], per_class=4, ext="jpg")
    for root, n in ((tmp_path / "png", 15), (tmp_path / "jpg", 12)):
        full_x, full_y = load_split("imagefolder", root, True, image_size=[7, 6])
        assert len(full_y) == n and len(decoded) == n
        for positions in ([3, 0, 11, 7], [n - 1], list(range(n))[::2]):
            decoded.clear()
            x, y = load_split("imagefolder", root, True, image_size=[7, 6],
                              select=lambda size: torch.tensor(positions))
            assert len(decoded) == len(positions)  # only the kept files were decoded
            assert torch.equal(x, full_x[positions]) and torch.equal(y, full_y[positions])
        decoded.clear()
    # the selection sees the split's size before anything is decoded
    sizes = []
    load_split("imagefolder", tmp_path / "png", False, image_size=[7, 6],
               select=lambda size: sizes.append(size) or torch.arange(2))
    assert sizes == [15] and len(decoded) == 2


def test_select_on_a_loader_that_reads_everything_indexes_the_split():
    full_x, full_y = load_split("digits", None, True)
    positions = torch.tensor([5, 1, 1400, 0])
    x, y = load_split("digits", None, True, select=lambda n: positions)
    assert torch.equal(x, full_x[positions]) and torch.equal(y, full_y[positions])


@pytest.mark.parametrize("positions,fragment", [
    (torch.tensor([0, 1437]), "outside 0..1436"),
    (torch.tensor([-1]), "outside 0..1436"),
    (torch.tensor([0.0, 1.0]), "integer positions"),
    (torch.zeros(2, 2, dtype=torch.int64), "1-D"),
])
def test_bad_selection_is_one_line(tmp_path, positions, fragment):
    with pytest.raises(EENetError) as err:
        load_split("digits", None, True, select=lambda n: positions)
    assert fragment in assert_one_line(err)
    write_imagefolder(tmp_path, per_class=2)
    with pytest.raises(EENetError) as err:
        load_split("imagefolder", tmp_path, True, select=lambda n: torch.tensor([6]))
    assert "outside 0..5" in assert_one_line(err)


def test_datamodule_subsets_decode_only_kept_files_same_samples(tmp_path, decoded):
    """Pushing the subset down to the file list keeps exactly the samples of decode-all-then-choose."""
    write_imagefolder(tmp_path, sizes=[(6, 5), (9, 7)], per_class=12)  # 36 train, 36 test
    dm = ClassificationDataModule("imagefolder", str(tmp_path), mean=[0.5] * 3, std=[0.25] * 3,
                                  image_size=[8, 8], val_size=4, train_subset=15, test_subset=10,
                                  split_seed=3)
    dm.setup(None)
    assert len(decoded) == 15 + 10 and len(set(decoded)) == 25
    assert dm.split_sizes == {"train": 11, "val": 4, "test": 10}
    # the choice of the data module's docstring, made on the whole split: the first
    # train_subset of a fixed permutation (split_seed), its first val_size for validation
    order = torch.randperm(36, generator=torch.Generator().manual_seed(3))[:15]
    assert torch.equal(dm.val_indices, order[:4].sort().values)
    assert torch.equal(dm.train_indices, order[4:].sort().values)
    test_order = torch.randperm(36, generator=torch.Generator().manual_seed(3))[:10]
    assert torch.equal(dm.test_indices, test_order.sort().values)
    # and the tensors are those of the whole split, decoded, at those positions
    for train, pairs in ((True, [(dm.train_dataset, dm.train_indices),
                                 (dm.val_dataset, dm.val_indices)]),
                         (False, [(dm.test_dataset, dm.test_indices)])):
        decoded.clear()
        full_x, full_y = load_split("imagefolder", tmp_path, train, image_size=[8, 8])
        assert len(decoded) == 36
        for dataset, positions in pairs:
            assert torch.equal(dataset.images, full_x[positions])
            assert torch.equal(dataset.labels, full_y[positions])
    # a subset as large as the split keeps everything, in file order
    big = ClassificationDataModule("imagefolder", str(tmp_path), mean=[0.5] * 3, std=[0.25] * 3,
                                   image_size=[8, 8], val_size=4, test_subset=100)
    big.setup("test")
    assert torch.equal(big.test_indices, torch.arange(36))


def test_cifar10_jpeg_smoke_subsets_decode_only_kept_files(data_root, decoded):
    """The SMOKE tables' settings on the CIFAR-10 (JPEG) folder of the data root: 600 + 200
    files decoded, not all (60,000 real files, 950 small ones)."""
    root = data_root.path / "cifar10-jpeg"
    dm = ClassificationDataModule("imagefolder", str(root),
                                  mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616],
                                  image_size=[32, 32], val_size=150, train_subset=600,
                                  test_subset=200)
    start = time.perf_counter()
    dm.setup(None)
    seconds = time.perf_counter() - start
    assert len(decoded) == 800 and dm.split_sizes == {"train": 450, "val": 150, "test": 200}
    # fewer than all: the subsets choose among more files than they keep
    assert len(list(root.glob("train/*/*.jpg"))) > 600 and len(list(root.glob("test/*/*.jpg"))) > 200
    # each label is the class folder of the file it was decoded from
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes == sorted(CIFAR10_CLASSES)
    train_files = [Path(p) for p in decoded[:600]]
    label_of = dict(zip(dm.train_indices.tolist(), dm.train_dataset.labels.tolist()))
    label_of.update(zip(dm.val_indices.tolist(), dm.val_dataset.labels.tolist()))
    assert [classes.index(p.parent.name) for p in train_files] == [
        label_of[i] for i in sorted(label_of)]  # files are decoded in split order
    print(f"setup with SMOKE subsets: {seconds:.2f} s")


# ----------------------------------------------------------------------------- missing files

MISSING = {
    "mnist": ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"],
    "fashion_mnist": ["FashionMNIST/raw/train-images-idx3-ubyte",
                      "FashionMNIST/raw/t10k-images-idx3-ubyte"],
    "cifar10": ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/data_batch_5",
                "cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
    "cifar100": ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
    "svhn": ["train_32x32.mat"],
    "imagefolder": ["train/", "test/"],
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_files_fail_fast(tmp_path, monkeypatch, name):
    import torchvision.datasets as tvd

    def boom(*args, **kwargs):
        raise AssertionError("torchvision must not be called when files are missing")

    for cls in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "SVHN", "ImageFolder"):
        monkeypatch.setattr(getattr(tvd, cls), "__init__", boom)
    with pytest.raises(EENetError) as err:
        load_split(name, tmp_path, train=True, download=False)
    message = assert_one_line(err)
    assert f"'{name}'" in message and str(tmp_path) in message
    for rel in MISSING[name]:
        assert rel in message, (rel, message)
    assert ("download=true" in message) == (name != "imagefolder")
    assert set(MISSING[name]) <= set(missing_files(name, tmp_path, True))


def test_missing_only_the_absent_files(tmp_path):
    write_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    assert missing_files("mnist", tmp_path) == ["MNIST/raw/t10k-labels-idx1-ubyte"]
    with pytest.raises(EENetError) as err:  # torchvision needs all four, even for train
        load_split("mnist", tmp_path, train=True)
    message = assert_one_line(err)
    assert "t10k-labels-idx1-ubyte" in message and "train-images" not in message
    write_svhn(tmp_path / "svhn", n_test=3)
    (tmp_path / "svhn" / "train_32x32.mat").unlink()
    assert load_split("svhn", tmp_path / "svhn", train=False)[0].shape == (3, 3, 32, 32)
    with pytest.raises(EENetError, match="train_32x32.mat"):
        load_split("svhn", tmp_path / "svhn", train=True)


def test_unreadable_files_are_one_line_errors(tmp_path):
    write_mnist(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(EENetError) as err:
        load_split("mnist", tmp_path, train=True)
    assert assert_one_line(err).startswith("could not read dataset 'mnist'")
    write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(EENetError) as err:
        load_split("cifar10", tmp_path / "c", train=True)
    message = assert_one_line(err)
    assert "could not read dataset 'cifar10'" in message and "data_batch_3" in message
    assert load_split("cifar10", tmp_path / "c", train=False)[0].shape == (4, 3, 32, 32)


def test_datamodule_prepare_data_reports_missing_files(tmp_path):
    dm = ClassificationDataModule("mnist", str(tmp_path), mean=[0.1307], std=[0.3081])
    assert dm.input_size == (1, 28, 28) and dm.num_classes == 10
    with pytest.raises(EENetError) as err:
        dm.prepare_data()
    assert "MNIST/raw/train-images-idx3-ubyte" in assert_one_line(err)


def test_root_required():
    with pytest.raises(EENetError) as err:
        load_split("cifar10", None, train=True)
    assert "root" in assert_one_line(err)


def test_download_without_network_fails_fast(tmp_path, monkeypatch):
    """The network is blocked in this process (name lookups and connections refused at once),
    so the test is the same on machines with and without network access."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:1])  # the address looked up or connected to
        raise OSError("network blocked by the test")

    from torchvision.datasets import MNIST

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(EENetError) as err:
        load_split("mnist", tmp_path, train=True, download=True)
    message = assert_one_line(err)
    assert message.startswith("could not download dataset 'mnist'")
    assert "network blocked by the test" in message
    # fails fast, counted rather than timed: each of torchvision's mirrors is tried once for
    # the first file, then the error comes back (no retries, no other files, nothing written)
    assert len(attempts) == len(MNIST.mirrors), attempts
    assert not any(tmp_path.rglob("*-ubyte*"))


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_download_errors_become_one_line(tmp_path, monkeypatch, name):
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service\nnot known")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(EENetError) as err:
        load_split(name, tmp_path, train=True, download=True)
    message = assert_one_line(err)
    assert message.startswith(f"could not download dataset '{name}'")
    assert "Name or service not known" in message


# ----------------------------------------------------------------------------- real data


def _needs_real(data_root, name: str, what: str) -> None:
    if not data_root.is_real(name):
        pytest.skip(f"needs the real {name} files in {data_root.shared} (absent; the small ones "
                    f"written instead cannot show {what})")


def test_mnist_idx_files_of_the_data_root(data_root):
    """MNIST as loaded from the data root is the idx files' bytes, image for image."""
    raw = data_root.path / "MNIST" / "raw"
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_split("mnist", data_root.path, train=train)
        pixels = np.fromfile(raw / f"{prefix}-images-idx3-ubyte", dtype=np.uint8)
        stored = np.fromfile(raw / f"{prefix}-labels-idx1-ubyte", dtype=np.uint8)
        assert images.shape == (len(stored) - 8, 1, 28, 28) and images.dtype == torch.uint8
        assert np.array_equal(images.numpy().reshape(-1), pixels[16:])  # after the 16-byte header
        assert np.array_equal(labels.numpy(), stored[8:])  # after the 8-byte header


@pytest.mark.data
def test_real_mnist_published_facts(data_root):
    _needs_real(data_root, "mnist", "the published sizes and label counts")
    images, labels = load_split("mnist", data_root.path, train=True)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                               5851, 5949]
    test_images, test_labels = load_split("mnist", data_root.path, train=False)
    assert test_images.shape == (10000, 1, 28, 28)
    assert test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_cifar10_jpeg_first_images(data_root):
    from PIL import Image

    root = data_root.path / "cifar10-jpeg"
    images, labels = load_split("imagefolder", root, train=True, max_per_class=3)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    # the first files of each class folder, decoded as PIL decodes them (both libjpeg-turbo
    # with its default integer IDCT and fancy upsampling: the same pixels)
    for c, name in enumerate(sorted(CIFAR10_CLASSES)):
        for i, path in enumerate(sorted((root / "train" / name).iterdir())[:3]):
            with Image.open(path) as image:
                pil = np.asarray(image.convert("RGB"))
            assert np.array_equal(images[3 * c + i].permute(1, 2, 0).numpy(), pil), path
    test_images, test_labels = load_split("imagefolder", root, train=False, max_per_class=1)
    assert test_images.shape == (10, 3, 32, 32) and test_labels.tolist() == list(range(10))
    assert dataset_info("imagefolder", root)["num_classes"] == 10


@pytest.mark.data
@pytest.mark.slow
def test_real_cifar10_jpeg_full_train(data_root):
    _needs_real(data_root, "cifar10_jpeg", "the 5,000 images of each class")
    start = time.perf_counter()
    images, labels = load_split("imagefolder", data_root.path / "cifar10-jpeg", train=True)
    seconds = time.perf_counter() - start
    assert images.shape == (50000, 3, 32, 32)
    assert torch.bincount(labels).tolist() == [5000] * 10
    print(f"decoding 50,000 JPEGs took {seconds:.1f} s")  # a measurement, not a machine-bound test


# ----------------------------------------------------------------------------- BatchTransform


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.double() / 255 - m) / s


def test_batch_transform_normalisation_exact():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8)
    x = x.view(2, 3, 4, 4)
    mean, std = [0.5, 0.25, 0.0], [0.5, 0.125, 2.0]
    out = BatchTransform(mean, std)(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), _normalise(x, mean, std), atol=1e-6, rtol=0)
    # a known value: pixel 255 in channel 0 -> (1 - 0.5) / 0.5 = 1
    assert BatchTransform(mean, std)(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))[0, 0] == 1
    floats = x.float() / 255
    assert torch.allclose(BatchTransform(mean, std)(floats), out, atol=1e-6)


def test_batch_transform_crop_identity_and_shape():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen)
    plain = BatchTransform([0.5] * 3, [0.2] * 3)(x)
    assert torch.equal(BatchTransform([0.5] * 3, [0.2] * 3, ["crop"], crop_padding=0)(x), plain)
    cropped = BatchTransform([0.5] * 3, [0.2] * 3, ["crop"], crop_padding=2)(x, generator=gen)
    assert cropped.shape == x.shape and not torch.equal(cropped, plain)


def test_batch_transform_crop_windows():
    t = BatchTransform([0.0], [1.0], ["crop"], crop_padding=3)
    x = torch.randint(1, 256, (40, 1, 5, 7), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    params = t.sample_params(40, torch.Generator().manual_seed(2))
    offsets = params["offsets"]
    assert offsets.shape == (40, 2) and offsets.min() >= 0 and offsets.max() <= 6
    assert len({tuple(o) for o in offsets.tolist()}) > 5  # independent offsets per sample
    out = t.apply(x, params)
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i, (top, left) in enumerate(offsets.tolist()):
        window = padded[i, :, top:top + 5, left:left + 7]
        assert torch.equal(out[i], window.float() / 255)


def test_batch_transform_hflip_exact_samples():
    t = BatchTransform([0.1, 0.2], [0.3, 0.4], ["hflip"])
    x = torch.randint(0, 256, (32, 2, 4, 6), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(3))
    params = t.sample_params(32, torch.Generator().manual_seed(4))
    flip = params["flip"]
    assert 0 < int(flip.sum()) < 32
    out = t.apply(x, params)
    expected = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    assert torch.equal(out, t.apply(expected, {}))
    for i in range(32):
        assert torch.equal(out[i], t.apply(x[i:i + 1].flip(-1) if flip[i] else x[i:i + 1], {})[0])
    # __call__ with a generator draws the same parameters as sample_params with that seed
    assert torch.equal(t(x, generator=torch.Generator().manual_seed(4)), out)


def test_batch_transform_reproducible_and_errors():
    t = BatchTransform([0.5], [0.5], ["crop", "hflip"])
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    a = t(x, generator=torch.Generator().manual_seed(7))
    b = t(x, generator=torch.Generator().manual_seed(7))
    c = t(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    seeded = BatchTransform([0.5], [0.5], ["crop", "hflip"],
                            generator=torch.Generator().manual_seed(7))
    assert torch.equal(seeded(x), a)
    assert AUGMENTATIONS == ("crop", "hflip", "cutout")
    with pytest.raises(EENetError) as err:
        BatchTransform([0.5], [0.5], ["crop", "rotate"])
    message = assert_one_line(err)
    assert "rotate" in message and "crop, hflip, cutout" in message
    with pytest.raises(EENetError, match="channels"):
        BatchTransform([0.5], [0.5])(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(EENetError, match="std"):
        BatchTransform([0.5], [0.0])
    with pytest.raises(EENetError, match="crop_padding"):
        BatchTransform([0.5], [0.5], ["crop"], crop_padding=-1)


def test_batch_transform_cutout_zeroes_one_clipped_square_after_normalising():
    """Cutout (DeVries & Taylor 2017): each sample gets one square of side cutout_size around
    its own drawn centre, clipped at the border, set to 0 (the channel mean) after
    normalisation; every other pixel is the normalised input. Checked pixel by pixel against
    the square each drawn centre defines."""
    mean, std = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
    t = BatchTransform(mean, std, ["cutout"], cutout_size=4)
    x = torch.randint(1, 256, (300, 3, 9, 7), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(5))
    params = t.sample_params(300, torch.Generator().manual_seed(6))
    out = t.apply(x, params)
    plain = BatchTransform(mean, std)(x)
    rows = (params["cutout"][:, 0] * 9).long()
    cols = (params["cutout"][:, 1] * 7).long()
    assert rows.min() == 0 and rows.max() == 8 and cols.min() == 0 and cols.max() == 6
    areas = set()
    for i in range(300):
        r0, c0 = int(rows[i]) - 2, int(cols[i]) - 2
        mask = torch.zeros(9, 7, dtype=torch.bool)
        mask[max(r0, 0):r0 + 4, max(c0, 0):c0 + 4] = True
        assert torch.equal(out[i][:, mask], torch.zeros(3, int(mask.sum())))
        assert torch.equal(out[i][:, ~mask], plain[i][:, ~mask])
        areas.add(int(mask.sum()))
    assert 16 in areas and min(areas) < 16  # whole squares inside, clipped ones at the border
    # drawn after crop and flip: adding cutout leaves their draws as they were
    both = BatchTransform(mean, std, ["crop", "hflip", "cutout"]).sample_params(
        8, torch.Generator().manual_seed(1))
    two = BatchTransform(mean, std, ["crop", "hflip"]).sample_params(
        8, torch.Generator().manual_seed(1))
    assert torch.equal(both["offsets"], two["offsets"]) and torch.equal(both["flip"], two["flip"])
    with pytest.raises(EENetError, match="cutout_size"):
        BatchTransform(mean, std, ["cutout"], cutout_size=0)


def test_datamodule_cutout_size_reaches_the_training_transform_only():
    dm = digits_module(augment=["cutout"], cutout_size=3)
    assert dm.train_transform.cutout_size == 3 and dm.train_transform.augment == ("cutout",)
    assert dm.eval_transform.augment == ()


# ----------------------------------------------------------------------------- batched dataset


def test_batched_dataset_and_loader_with_workers():
    images = torch.arange(23 * 1 * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8)
    images = images.view(23, 1, 2, 2)
    labels = torch.arange(23) % 4
    ds = InMemoryBatchDataset(images, labels)
    x, y = ds[[3, 1, 7]]
    assert torch.equal(x, to_float(images[[3, 1, 7]])) and y.tolist() == [3, 1, 3]
    single_x, single_y = ds[5]
    assert single_x.shape == (1, 2, 2) and int(single_y) == 1

    for workers in (0, 2):
        batches = list(make_loader(ds, batch_size=5, shuffle=False, num_workers=workers))
        assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
        assert torch.equal(torch.cat([b[0] for b in batches]), to_float(images))
        assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    shuffled = list(make_loader(ds, batch_size=4, shuffle=True, num_workers=2))
    seen = torch.cat([b[0] for b in shuffled]).view(23, -1)
    expected = to_float(images).view(23, -1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, expected.tolist()))


def test_batched_dataset_workers_augment_differently():
    images = torch.randint(0, 256, (64, 1, 6, 6), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    ds = InMemoryBatchDataset(images, torch.zeros(64, dtype=torch.int64),
                              BatchTransform([0.0], [1.0], ["crop"], crop_padding=2),
                              generator=torch.Generator().manual_seed(5))
    # the same indices in two workers: the two batches must not be cropped identically
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=[list(range(64))] * 2,
                                         num_workers=2)
    first, second = [b[0] for b in loader]
    assert first.shape == (64, 1, 6, 6) and not torch.equal(first, second)


# ----------------------------------------------------------------------------- data module


def digits_module(**kwargs) -> ClassificationDataModule:
    args = dict(name="digits", mean=DIGITS_MEAN, std=DIGITS_STD, batch_size=64)
    args.update(kwargs)
    return ClassificationDataModule(**args)


def test_datamodule_digits_splits(monkeypatch):
    import eenet.data.datamodule as dm_module

    calls = []
    real = dm_module.load_split
    monkeypatch.setattr(dm_module, "load_split", lambda *a, **k: calls.append(a) or real(*a, **k))
    dm = digits_module(val_size=0.1)
    assert dm.input_size == (1, 8, 8) and dm.num_classes == 10 and calls == []
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("fit")
    assert len(calls) == 1
    dm.setup("test")
    dm.setup(None)
    assert len(calls) == 2 and dm.load_count == 2
    sizes = dm.split_sizes
    assert sizes == {"train": 1293, "val": 144, "test": 360}
    assert sizes["train"] + sizes["val"] == 1437
    train_idx, val_idx = set(dm.train_indices.tolist()), set(dm.val_indices.tolist())
    assert not train_idx & val_idx and train_idx | val_idx == set(range(1437))
    # the samples themselves: val images come from the training split at those positions
    x_train, _ = load_split("digits", None, train=True)
    assert torch.equal(dm.val_dataset.images, x_train[dm.val_indices])
    # same split_seed, same split; other seed, other split
    again, other = digits_module(val_size=0.1), digits_module(val_size=0.1, split_seed=1)
    again.setup("fit")
    other.setup("fit")
    assert torch.equal(again.val_indices, dm.val_indices)
    assert not torch.equal(other.val_indices, dm.val_indices)


def test_datamodule_crop_padding_reaches_the_training_transform():
    """The padding is a data set setting: 4 pixels of an 8x8 digit would shift it by half its width."""
    assert digits_module().train_transform.crop_padding == 4  # the BatchTransform default
    dm = digits_module(augment=["crop"], crop_padding=1)
    assert dm.train_transform.crop_padding == 1 and dm.eval_transform.augment == ()
    offsets = dm.train_transform.sample_params(1000, torch.Generator().manual_seed(0))["offsets"]
    assert offsets.min() == 0 and offsets.max() == 2  # shifts of -1, 0, +1 pixel
    with pytest.raises(EENetError, match="crop_padding must be an integer >= 0"):
        digits_module(augment=["crop"], crop_padding=-1)
    from omegaconf import OmegaConf
    conf = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "digits.yaml"
    assert OmegaConf.load(conf).datamodule.crop_padding == 1


def test_datamodule_loaders_and_augmentation():
    dm = digits_module(augment=["crop", "hflip"], val_size=100, eval_batch_size=50)
    dm.setup(None)
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.dtype == torch.float32 and batch_x.shape == (64, 1, 8, 8)
    assert batch_y.dtype == torch.int64 and batch_y.shape == (64,)
    for loader, n in ((dm.val_dataloader(), 100), (dm.test_dataloader(), 360)):
        first = list(loader)
        second = list(loader)
        assert sum(len(y) for _, y in first) == n and len(first[0][1]) == 50
        for (xa, ya), (xb, yb) in zip(first, second):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # validation batches are only normalised: exactly the loaded pixels, in order
    val_x = torch.cat([x for x, _ in dm.val_dataloader()])
    expected = (dm.val_dataset.images - DIGITS_MEAN[0]) / DIGITS_STD[0]
    assert torch.allclose(val_x, expected, atol=1e-6)
    # training samples are augmented: the same indices twice give different tensors
    idx = list(range(64))
    assert not torch.equal(dm.train_dataset[idx][0], dm.train_dataset[idx][0])
    assert torch.equal(dm.val_dataset[idx][0], dm.val_dataset[idx][0])
    # training batches cover the training split once per epoch, shuffled
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(labels) == dm.split_sizes["train"] == 1337
    assert not torch.equal(labels, dm.train_dataset.labels)
    assert torch.equal(labels.sort().values, dm.train_dataset.labels.sort().values)


def test_datamodule_workers():
    dm = digits_module(num_workers=2, test_subset=100, eval_batch_size=32)
    dm.setup("test")
    with_workers = list(dm.test_dataloader())
    dm.num_workers = 0
    without = list(dm.test_dataloader())
    assert len(with_workers) == len(without) == 4
    for (xa, ya), (xb, yb) in zip(with_workers, without):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_datamodule_subsets_and_describe():
    dm = digits_module(train_subset=200, test_subset=50, val_size=0.25, split_seed=3)
    assert dm.split_sizes == {"train": 150, "val": 50, "test": 50}
    assert len(set(dm.train_indices.tolist()) | set(dm.val_indices.tolist())) == 200
    info = dm.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["name"] == "digits" and info["root"] is None
    assert info["sizes"] == {"train": 150, "val": 50, "test": 50}
    assert info["mean"] == DIGITS_MEAN and info["std"] == DIGITS_STD and info["augment"] == []
    assert info["input_size"] == [1, 8, 8] and info["num_classes"] == 10


@pytest.mark.parametrize("kwargs,fragment", [
    ({"val_size": 0.0}, "val_size"),
    ({"val_size": 1.0}, "val_size"),
    ({"val_size": 1.5}, "val_size"),
    ({"val_size": -3}, "val_size"),
    ({"val_size": "a"}, "val_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "1 channel(s)"),
    ({"mean": [0.5], "std": [0.2, 0.2]}, "std"),
    ({"augment": ["mixup"]}, "crop, hflip, cutout"),
    ({"augment": ["cutout"], "cutout_size": 0}, "cutout_size"),
    ({"name": "imagenet"}, "unknown dataset"),
    ({"image_size": [8, 8]}, "imagefolder"),
    ({"train_subset": 0}, "train_subset"),
])
def test_datamodule_bad_arguments(kwargs, fragment):
    with pytest.raises(EENetError) as err:
        digits_module(**kwargs)
    assert fragment in assert_one_line(err)


def test_datamodule_val_count_too_large_and_unknown_args():
    dm = digits_module(val_size=1437)
    with pytest.raises(EENetError) as err:
        dm.setup("fit")
    message = assert_one_line(err)
    assert "1437" in message and "val_size" in message
    with pytest.raises(TypeError):
        digits_module(shuffle=True)
    with pytest.raises(EENetError) as err:
        ClassificationDataModule("digits", mean=[0.5])
    assert "both mean and std" in assert_one_line(err)


def test_datamodule_default_normalisation_is_the_records():
    dm = ClassificationDataModule("digits")
    assert dm.mean == list(get_dataset("digits").mean) == DIGITS_MEAN
    assert dm.std == list(get_dataset("digits").std) == DIGITS_STD
    assert ClassificationDataModule("cifar10", "/nowhere").mean == [0.4914, 0.4822, 0.4465]
    with pytest.raises(EENetError) as err:
        ClassificationDataModule("imagefolder", "/nowhere")
    assert "no standard normalisation" in assert_one_line(err)


def test_datamodule_imagefolder_and_channel_check(tmp_path):
    write_imagefolder(tmp_path, sizes=[(6, 5), (9, 7)], per_class=4)
    dm = ClassificationDataModule("imagefolder", str(tmp_path), mean=[0.5] * 3, std=[0.25] * 3,
                                  image_size=[10, 12], val_size=3, batch_size=4)
    assert dm.num_classes == 3 and dm.input_size == (3, 10, 12) and dm.load_count == 0
    assert dm.split_sizes == {"train": 9, "val": 3, "test": 12}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 10, 12)
    with pytest.raises(EENetError) as err:  # image folders load as RGB
        ClassificationDataModule("imagefolder", str(tmp_path), mean=[0.5], std=[0.25])
    assert "3 channel(s)" in assert_one_line(err)
    missing = ClassificationDataModule("imagefolder", str(tmp_path / "none"), mean=[0.5] * 3,
                                       std=[0.25] * 3)
    with pytest.raises(EENetError, match="missing train/, test/"):
        missing.setup("fit")


def test_datamodule_from_hydra_yaml():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create("""
    _target_: eenet.data.ClassificationDataModule
    name: digits
    root: null
    download: false
    mean: [0.3053]
    std: [0.3760]
    augment: [crop]
    val_size: 0.15
    split_seed: 0
    batch_size: 32
    eval_batch_size: 512
    num_workers: 0
    train_subset: null
    test_subset: null
    """)
    dm = instantiate(cfg)
    assert isinstance(dm, ClassificationDataModule)
    assert dm.augment == ["crop"] and dm.mean == [0.3053]
    assert dm.split_sizes == {"train": 1221, "val": 216, "test": 360}
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8)


def test_datamodule_with_lightning_trainer(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
            self.seen = {"train": 0, "val": 0, "test": 0}

        def _step(self, batch, split):
            x, y = batch
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
            self.seen[split] += len(y)
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def training_step(self, batch, _):
            return self._step(batch, "train")

        def validation_step(self, batch, _):
            self._step(batch, "val")

        def test_step(self, batch, _):
            self._step(batch, "test")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(0, workers=True, verbose=False)
    dm = digits_module(val_size=100, batch_size=128, eval_batch_size=256)
    model = Tiny()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.seen == {"train": 1337, "val": 100, "test": 360}
    assert dm.load_count == 2
