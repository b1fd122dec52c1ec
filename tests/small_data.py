"""Small data sets written in each data set's own on-disk layout, so data tests run on any machine.

The loaders read these files exactly as they read the real ones: MNIST-format
idx files, CIFAR-10 python pickle batches, SVHN ``.mat`` files, image class
folders (PNG or JPEG, CIFAR-10 (JPEG) and Visual Wake Words among them),
Speech Commands wav folders and the MLPerf Tiny keyword-spotting ``.npz``.

:func:`build_data_root` makes one data root holding every data set that the
experiment configs and the paper tables read (``conf/experiment/*.yaml``,
``experiments/tables.py``): each is linked from the real data folder
(``../shared/data`` beside the repository, or ``$EENET_SHARED_DATA``) when that
folder has it, and written small otherwise. The pixels and clips carry a class
signal (a class-dependent band, colour, blob or tone under noise) so that a
network can learn something in one epoch, but they are not the real data: a
test that needs the real files (a published label count, MLPerf Tiny's own
MFCCs) asks :meth:`DataRoot.is_real` and skips with that reason otherwise.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: Environment variable naming the real data folder; point it at a missing folder
#: (``EENET_SHARED_DATA=/nonexistent``) to run the tests as on a fresh clone.
SHARED_DATA_ENV = "EENET_SHARED_DATA"
SR = 16000
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def shared_data_dir() -> Path:
    """The real data folder: ``$EENET_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get(SHARED_DATA_ENV) or REPO.parent / "shared" / "data")


# ----------------------------------------------------------------------------- MNIST idx


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed idx file (MNIST's format): magic 0x0000 0x08 ndim, big-endian dims."""
    assert array.dtype == np.uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 12, n_test: int = 7,
                seed: int = 0, signal: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; returns what was written.

    Random pixels, or with ``signal`` dim noise under a bright 3-pixel band whose
    height is the label (rows 2c+2 .. 2c+4), labels cycling through 0..9.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if signal:
            labels = (np.arange(n) % 10).astype(np.uint8)
            images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
            for image, label in zip(images, labels):
                image[2 + 2 * label:5 + 2 * label, 4:24] = rng.integers(200, 256, (3, 20))
        else:
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


# ----------------------------------------------------------------------------- CIFAR, SVHN


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0):
    """``root/cifar-10-batches-py``: five data batches, the test batch and batches.meta (pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, handle)
        written["test" if name == "test_batch" else "train"].append((data, labels))
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 4,
                     "num_vis": 3072}, handle)
    return {k: (np.concatenate([d for d, _ in v]), np.concatenate([lab for _, lab in v]))
            for k, v in written.items()}


def write_cifar100(root: Path, n_train: int = 9, n_test: int = 5, seed: int = 0):
    """``root/cifar-100-python/{train,test,meta}`` (pickles with fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        with open(folder / name, "wb") as handle:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": name,
                         "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                         "data": data}, handle)
        written[name] = (data, np.array(fine))
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, handle)
    return written


def write_svhn(root: Path, n_train: int = 8, n_test: int = 5, seed: int = 0):
    """``root/{train,test}_32x32.mat``: X (32, 32, 3, N), y with the digit 0 stored as 10."""
    import scipy.io

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        digits = np.arange(n) % 10
        digits[0] = 0  # make sure the digit 0 (stored as label 10) is there
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, digits)
    return written


# ----------------------------------------------------------------------------- image folders


def smooth_image(rng: np.random.Generator, shape: tuple[int, ...], label: int,
                 num_classes: int) -> np.ndarray:
    """A low-frequency image (one sine wave of random direction and phase per channel, at most
    1.5 cycles across) around a colour set by ``label``: JPEG keeps it within a few grey levels."""
    h, w = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    y, x = np.mgrid[0:h, 0:w]
    planes = []
    for c in range(channels):
        fy, fx = rng.uniform(0.2, 1.5, 2)
        colour = 128 + 60 * np.cos(2 * np.pi * (label / num_classes + c / 3))
        wave = 50 * np.sin(2 * np.pi * (fy * y / h + fx * x / w) + rng.uniform(0, 2 * np.pi))
        planes.append(colour + wave)
    image = np.clip(np.rint(np.stack(planes, -1)), 0, 255).astype(np.uint8)
    return image if len(shape) == 3 else image[..., 0]


def write_imagefolder(root: Path, sizes=None, classes=("cat", "ant", "bee"), per_class=3,
                      seed: int = 0, mode: str = "RGB", ext: str = "png", smooth: bool = False,
                      names: str = "{i:03d}"):
    """``root/{train,test}/<class>/<name>.<ext>``; returns {split: (HWC arrays, labels)} in loading order.

    Args:
        sizes: (h, w) of the images, cycled; (6, 5) when not given.
        per_class: files per class and split, or ``{"train": n, "test": m}``.
        smooth: :func:`smooth_image` pixels instead of uniform noise (JPEG keeps them).
        names: file name pattern of the i-th file of a class.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, dict) else {"train": per_class, "test": per_class}
    written = {}
    for split in ("train", "test"):
        arrays, labels = [], []
        for index, cls in enumerate(sorted(classes)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(counts[split]):
                h, w = sizes[(index + i) % len(sizes)] if sizes else (6, 5)
                shape = (h, w, 3) if mode == "RGB" else (h, w)
                if smooth:
                    array = smooth_image(rng, shape, index, len(classes))
                else:
                    array = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(array, mode=mode).save(folder / f"{names.format(i=i)}.{ext}")
                arrays.append(array)
                labels.append(index)
        written[split] = (arrays, labels)
    return written


def write_cifar10_jpeg(root: Path, n_train: int = 70, n_test: int = 25, seed: int = 0):
    """``root/{train,test}/<class>/NNNN.jpg``: the ten CIFAR-10 class folders of 32x32 JPEGs."""
    return write_imagefolder(root, sizes=[(32, 32)], classes=CIFAR10_CLASSES, seed=seed, ext="jpg",
                             per_class={"train": n_train, "test": n_test}, smooth=True,
                             names="{i:04d}")


def write_image(path: Path, size, value: int, fmt: str) -> None:
    """Noise (sd 10) around the grey level ``value``, ``size`` = (h, w), saved as ``fmt``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = np.clip(rng.normal(value, 10, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def make_vww(root: Path, negative: str = "no_person") -> None:
    """Visual Wake Words' folders: 3 + 2 bright person JPEGs, 3 + 2 dark PNGs of ``negative``."""
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_image(root / split / "person" / f"p{i}.jpg", (120, 100), 200, "JPEG")
            write_image(root / split / negative / f"n{i}.png", (50, 50), 40, "PNG")


def write_vww(root: Path, n_train: int = 150, n_test: int = 50, seed: int = 0) -> None:
    """``root/{train,test}/{person,no_person}/*.jpg``, 96x96 as MLPerf Tiny's copy: noisy scenes,
    the person images with a bright upright ellipse (a figure) at a random place."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:96]
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("no_person", "person"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                scene = rng.normal(rng.uniform(60, 160), 25, (96, 96, 3))
                if cls == "person":
                    cy, cx = rng.uniform(30, 66, 2)
                    figure = ((y - cy) / 28) ** 2 + ((x - cx) / 12) ** 2 <= 1
                    scene[figure] = rng.normal(230, 10, (int(figure.sum()), 3))
                pixels = np.clip(scene, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{i:04d}.jpg", format="JPEG")


# ----------------------------------------------------------------------------- audio


def write_wav(path: Path, seconds: float, freq: float, rate: int = SR) -> np.ndarray:
    """A sine of ``freq`` Hz at 0.3 of full scale, 16-bit PCM; returns the samples."""
    from scipy.io import wavfile

    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)
           ).astype(np.int16)
    wavfile.write(str(path), rate, pcm)
    return pcm


def make_speech_commands(root: Path) -> dict[str, np.ndarray]:
    """Speech Commands v2's layout: every keyword with a train and a test clip, two unknown words,
    one noise file (3.2 s), the testing and validation lists."""
    from scipy.io import wavfile

    from eenet.data.audio import KWS_CLASSES

    written, testing, validation = {}, [], []
    words = [*KWS_CLASSES[:10], "bed", "cat"]
    for i, word in enumerate(words):
        for speaker in ("aa11", "bb22"):
            if word == "cat" and speaker == "bb22":
                continue
            rel = f"{word}/{speaker}_nohash_0.wav"
            seconds = 0.5 if word == "go" else 1.0  # a short clip gets padded
            written[rel] = write_wav(root / rel, seconds, 200.0 + 90 * i + (speaker == "bb22"))
            if speaker == "bb22":
                testing.append(rel)
    written["yes/cc33_nohash_1.wav"] = write_wav(root / "yes/cc33_nohash_1.wav", 1.0, 777.0)
    validation.append("yes/cc33_nohash_1.wav")
    rng = np.random.default_rng(0)
    noise = (rng.normal(0, 3000, int(3.2 * SR))).astype(np.int16)
    (root / "_background_noise_").mkdir()
    wavfile.write(str(root / "_background_noise_" / "white.wav"), SR, noise)
    written["noise"] = noise
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "README.md").write_text("not a word folder")
    return written


def write_kws12_subset(root: Path, per_class: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/speech_commands_kws12_1000.npz`` with the real file's arrays (no pickle).

    ``audio`` int16 (N, 16000): a class tone (250 + 150 c Hz, none for 'silence') in noise;
    ``mfcc`` int8 (N, 49, 10): eenet's own quantised MFCCs of that audio (so a comparison with
    them tests nothing: MLPerf Tiny's front end is only in the real file); ``lfbe`` int8: a
    stand-in of the same shape (10 mel bands' log energies, rounded); ``y``, ``classes``,
    ``filenames``, ``sample_rate`` as in the real file. Stored, not deflated as the real
    file is (``numpy.load`` reads both alike; deflating the noise costs a second). Returns the arrays.
    """
    from eenet.data.audio import KWS_CLASSES, SUBSET_FILE, kws_features, mel_weight_matrix

    rng = np.random.default_rng(seed)
    n = per_class * len(KWS_CLASSES)
    y = np.repeat(np.arange(len(KWS_CLASSES)), per_class)
    rng.shuffle(y)
    t = np.arange(SR) / SR
    audio = rng.normal(0, 800, (n, SR))
    for i, label in enumerate(y):
        if KWS_CLASSES[label] != "silence":
            audio[i] += rng.uniform(4000, 9000) * np.sin(2 * np.pi * (250 + 150 * label) * t)
    audio = np.clip(audio, -32768, 32767).astype(np.int16)
    mfcc = kws_features(audio)[:, 0].numpy().astype(np.int8)  # quantised: integers in -128..127
    frames = np.lib.stride_tricks.sliding_window_view(audio / 32768, 480, axis=1)[:, ::320][:, :49]
    power = np.abs(np.fft.rfft(frames * np.hanning(480), 512)) ** 2
    bands = power @ mel_weight_matrix(num_mel_bins=10).numpy().astype(np.float64)
    lfbe = np.clip(np.rint(10 * np.log10(bands + 1e-10)), -128, 127).astype(np.int8)
    filenames = np.array([f"tst_{i:06d}_{KWS_CLASSES[c].capitalize()}_{c}.bin"
                          for i, c in enumerate(y)])
    arrays = {"audio": audio, "mfcc": mfcc, "lfbe": lfbe, "y": y.astype(np.int64),
              "filenames": filenames, "classes": np.array(KWS_CLASSES),
              "sample_rate": np.array(SR, dtype=np.int64)}
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / SUBSET_FILE, **arrays)
    return arrays


# ----------------------------------------------------------------------------- one data root


@dataclass(frozen=True)
class DataRoot:
    """A data root for the configs' ``data_root``; ``real`` names the data sets linked from the
    real data folder (the others were written small by :func:`build_data_root`)."""

    path: Path
    real: frozenset[str]
    shared: Path

    def is_real(self, name: str) -> bool:
        return name in self.real


#: (config name, path under the data root, loader name and root relative to it, writer)
_SETS = (
    ("mnist", "MNIST", ("mnist", "."), lambda d: write_mnist(d, "MNIST", 600, 200, signal=True)),
    ("cifar10_jpeg", "cifar10-jpeg", ("imagefolder", "cifar10-jpeg"),
     lambda d: write_cifar10_jpeg(d / "cifar10-jpeg")),
    ("kws12_subset", "speech_commands_kws12_1000.npz", ("kws12_subset", "."), write_kws12_subset),
    ("vww", "vww", ("vww", "vww"), lambda d: write_vww(d / "vww")),
)


def _has(shared: Path, loader: str, rel: str) -> bool:
    from eenet.data import missing_files

    base = shared / rel
    return base.is_dir() and not missing_files(loader, base)


def build_data_root(folder: Path, shared: Path | None = None) -> DataRoot:
    """``folder`` as a data root with MNIST, CIFAR-10 (JPEG), the keyword-spotting subset and VWW.

    Each is a symbolic link to ``shared``'s copy when ``shared`` has it complete (its
    loader's missing-files check finds nothing), else written small in its own layout:
    MNIST 600 + 200 idx images, CIFAR-10 (JPEG) 700 + 250 files, 360 keyword clips
    (the loader's 70/30 split), VWW 300 + 100 files.
    """
    shared = Path(shared) if shared is not None else shared_data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    real = set()
    for name, entry, (loader, rel), write in _SETS:
        if _has(shared, loader, rel):
            (folder / entry).symlink_to(shared / entry)
            real.add(name)
        else:
            write(folder)
    return DataRoot(folder, frozenset(real), shared)
