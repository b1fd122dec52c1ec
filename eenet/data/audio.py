"""Keyword spotting: the MLPerf Tiny MFCC front end and two Speech Commands loaders.

Data: Warden, "Speech Commands: A Dataset for Limited-Vocabulary Speech
Recognition", arXiv:1804.03209, 2018 (v2: 35 words, 16 kHz, 1 s clips).
Task and features: Banbury et al., "MLPerf Tiny Benchmark", NeurIPS Datasets
and Benchmarks 2021, keyword-spotting benchmark, whose reference front end
(``training/keyword_spotting/get_dataset.py``, built on ``tf.signal``) and
49x10 MFCC input follow Zhang et al., "Hello Edge: Keyword Spotting on
Microcontrollers", arXiv:1711.07128, 2017. Twelve classes: the ten words
``down go left no off on right stop up yes``, ``silence`` and ``unknown``.

MFCC front end (:func:`mfcc`, :func:`kws_features`), written out. A clip is
int16 PCM ``p[n]`` at 16 kHz:

    x[n]      = p[n] / 32768, zero-padded (or cut) to 16,000 samples
    x[n]     <- x[n] / max_n x[n]                      (peak normalisation, below)
    w[n]      = 0.5 - 0.5 cos(2 pi n / 480),  n < 480  (periodic Hann, 30 ms)
    X_t[f]    = | sum_{n<480} w[n] x[320 t + n] e^{-2 pi i f n / 512} |,
                t < 49 frames (20 ms stride, no padding), f = 0..256
    mel(h)    = 1127 ln(1 + h / 700)                   (HTK mel scale)
    E_t[j]    = sum_f X_t[f] M[f, j],  j < 40 triangular filters whose edges
                are evenly spaced in mel between mel(20 Hz) and mel(4000 Hz):
                M[f, j] = max(0, min((m_f - l_j) / (c_j - l_j), (u_j - m_f) / (u_j - c_j))),
                m_f = mel(f * 16000 / 512), and M[0, j] = 0 (no DC)
    L_t[j]    = ln(E_t[j] + 1e-6)
    c_t[k]    = sqrt(2 / 40) sum_j L_t[j] cos(pi k (2 j + 1) / 80),  k < 10   (DCT-II, HTK scale)

These are the formulas of ``tf.signal.stft`` (``fft_length`` the next power
of two), ``linear_to_mel_weight_matrix`` and ``mfccs_from_log_mel_spectrograms``
with the reference's settings; the filter bank sums magnitudes, not powers.
Like the reference, each clip is divided by its largest sample VALUE (not
its largest magnitude); a clip whose largest value is not positive (all
zeros) is left as it is, where the reference would divide by zero.

Quantisation (:func:`quantize_mfcc`): the DS-CNN of MLPerf Tiny takes int8
features ``q = trunc(c / 0.5847029 + 83)``. Scale and zero point were fitted
to the int8 ``mfcc`` array of ``speech_commands_kws12_1000.npz`` (the MLPerf
Tiny evaluation clips): computed from that file's ``audio`` with the formulas
above they reproduce 99.7% of its stored values exactly and the rest within
one step, except the few values above 127 that the reference's int8 cast
wrapped around to negative numbers; here they saturate at 127.

Loaders, each registered below it as a :class:`~eenet.data.registry.DatasetSpec`;
both return features as float32 ``(N, 1, 49, 10)`` images on that int8 grid
(values -128..127), normalised by default with the mean and population std
of every MFCC value of the 700 ``kws12_subset`` training clips (80.0572,
15.6136; ``eenet/conf/dataset/kws12_subset.yaml`` says how they were computed):

- ``kws12_subset``: ``root/speech_commands_kws12_1000.npz``, the 1,000 clips
  of MLPerf Tiny's evaluation subset with their stored int8 ``mfcc`` (or
  ``lfbe`` with ``features="lfbe"``). A SMALL REAL SUBSET, not the data set:
  it runs a pipeline end to end on real audio but cannot reproduce published
  accuracy. The file has no train/test split, so a fixed stratified one is
  made here (:func:`kws12_subset_split`: 70% train / 30% test per class,
  numpy seed 0); the data module carves validation from the 70%.
- ``speech_commands``: the full Speech Commands v2 in its own layout (see
  :func:`load_speech_commands`), features computed by :func:`kws_features`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from eenet.data.registry import DatasetSpec, one_line, register_dataset, require_files, root_path
from eenet.errors import EENetError

__all__ = [
    "BACKGROUND_DIR",
    "KEYWORDS",
    "KWS12_SUBSET",
    "KWS_CLASSES",
    "SPEECH_COMMANDS",
    "SUBSET_FILE",
    "dct_matrix",
    "kws12_subset_split",
    "kws_features",
    "load_kws12_subset",
    "load_speech_commands",
    "mel_weight_matrix",
    "mfcc",
    "missing_kws12_subset",
    "missing_speech_commands",
    "num_frames",
    "quantize_mfcc",
    "read_wav",
]

#: The 12 MLPerf Tiny keyword-spotting classes, in label order.
KWS_CLASSES = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes",
               "silence", "unknown")
#: The ten keywords (labels 0..9); every other word is ``unknown``.
KEYWORDS = KWS_CLASSES[:10]
SILENCE = KWS_CLASSES.index("silence")
UNKNOWN = KWS_CLASSES.index("unknown")

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000  # 1 s
WINDOW_SAMPLES = 480  # 30 ms
STRIDE_SAMPLES = 320  # 20 ms
NUM_MEL_BINS = 40
NUM_MFCC = 10
LOWER_HZ = 20.0
UPPER_HZ = 4000.0
LOG_OFFSET = 1e-6
#: int8 quantisation of the MFCC input (see the module docstring).
MFCC_SCALE = 0.5847029089927673
MFCC_ZERO_POINT = 83

SUBSET_FILE = "speech_commands_kws12_1000.npz"
SUBSET_TEST_FRACTION = 0.3
SUBSET_SPLIT_SEED = 0
SUBSET_FEATURES = ("mfcc", "lfbe")

BACKGROUND_DIR = "_background_noise_"
TESTING_LIST = "testing_list.txt"
VALIDATION_LIST = "validation_list.txt"
#: Every SILENCE_TEST_EVERY-th one-second window of a background-noise file
#: (windows 0, 10, 20, ...) goes to the test split, the others to train.
SILENCE_TEST_EVERY = 10
SPEECH_COMMANDS_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"

_CHUNK = 512  # clips per feature batch (bounds memory on the full data set)
#: Normalisation of the int8-grid MFCC input (see the loaders' section of the module docstring).
_MFCC_MEAN, _MFCC_STD = (80.0572,), (15.6136,)


# ----------------------------------------------------------------------------- front end


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``1127 ln(1 + hz / 700)``."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def num_frames(num_samples: int, window: int = WINDOW_SAMPLES, stride: int = STRIDE_SAMPLES) -> int:
    """Frames of an unpadded STFT: ``1 + (num_samples - window) // stride`` (49 for 1 s)."""
    return 0 if num_samples < window else 1 + (num_samples - window) // stride


def _fft_length(window: int) -> int:
    return 1 << (int(window) - 1).bit_length()


def mel_weight_matrix(num_mel_bins: int = NUM_MEL_BINS, num_spectrogram_bins: int = 257,
                      sample_rate: int = SAMPLE_RATE, lower_hz: float = LOWER_HZ,
                      upper_hz: float = UPPER_HZ) -> torch.Tensor:
    """Triangular mel filters ``M`` of shape ``(num_spectrogram_bins, num_mel_bins)``, float64.

    Filter ``j`` rises from edge ``j`` to edge ``j + 1`` and falls to edge
    ``j + 2`` of ``num_mel_bins + 2`` edges evenly spaced in mel between
    ``lower_hz`` and ``upper_hz``; its peak is 1. Row 0 (DC) is zero.
    """
    if not 0.0 <= lower_hz < upper_hz <= sample_rate / 2:
        raise EENetError(f"mel filter edges must satisfy 0 <= lower_hz < upper_hz <= "
                         f"sample_rate / 2, got {lower_hz}, {upper_hz} at {sample_rate} Hz")
    hz = np.linspace(0.0, sample_rate / 2, num_spectrogram_bins)[1:]
    m = hz_to_mel(hz)[:, None]
    edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz), num_mel_bins + 2)
    low, center, up = edges[:-2], edges[1:-1], edges[2:]
    rising = (m - low) / (center - low)
    falling = (up - m) / (up - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return torch.from_numpy(np.vstack([np.zeros((1, num_mel_bins)), weights]))


def dct_matrix(num_mel_bins: int = NUM_MEL_BINS, num_coefficients: int = NUM_MFCC) -> torch.Tensor:
    """DCT-II with HTK scaling, ``(num_mel_bins, num_coefficients)``, float64:
    ``D[j, k] = sqrt(2 / J) cos(pi k (2 j + 1) / (2 J))``."""
    j = np.arange(num_mel_bins)[:, None]
    k = np.arange(num_coefficients)[None, :]
    return torch.from_numpy(np.sqrt(2.0 / num_mel_bins)
                            * np.cos(np.pi * k * (2 * j + 1) / (2 * num_mel_bins)))


def mfcc(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE,
         window_samples: int = WINDOW_SAMPLES, stride_samples: int = STRIDE_SAMPLES,
         num_mel_bins: int = NUM_MEL_BINS, num_coefficients: int = NUM_MFCC,
         lower_hz: float = LOWER_HZ, upper_hz: float = UPPER_HZ) -> torch.Tensor:
    """MFCCs of float waveforms ``(..., T)`` -> ``(..., frames, num_coefficients)``.

    Frames of ``window_samples`` every ``stride_samples`` (no padding), a
    periodic Hann window, an FFT of the next power of two, magnitude, mel
    filter bank, ``ln(. + 1e-6)`` and DCT-II: the formulas of the module
    docstring. Computed in the waveform's floating dtype (float32 for others).
    """
    x = torch.as_tensor(waveform)
    if not torch.is_floating_point(x):
        x = x.to(torch.float32)
    if x.shape[-1] < window_samples:
        raise EENetError(f"a waveform of {x.shape[-1]} samples is shorter than one "
                         f"{window_samples}-sample window")
    n_fft = _fft_length(window_samples)
    window = torch.hann_window(window_samples, periodic=True, dtype=x.dtype)
    frames = x.unfold(-1, window_samples, stride_samples) * window
    spectrum = torch.fft.rfft(frames, n=n_fft).abs()
    mel = mel_weight_matrix(num_mel_bins, n_fft // 2 + 1, sample_rate, lower_hz, upper_hz)
    dct = dct_matrix(num_mel_bins, num_coefficients)
    log_mel = torch.log(spectrum @ mel.to(x.dtype) + LOG_OFFSET)
    return log_mel @ dct.to(x.dtype)


def quantize_mfcc(features: torch.Tensor) -> torch.Tensor:
    """MFCCs on MLPerf Tiny's int8 input grid, as float32: ``clamp(trunc(c/s + z), -128, 127)``."""
    q = torch.trunc(features / MFCC_SCALE + MFCC_ZERO_POINT)
    return q.clamp_(-128, 127).to(torch.float32)


def pcm_to_float(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Integer PCM -> float32 in [-1, 1) (int16 / 32768, int32 / 2^31, uint8 centred).

    Floating-point samples are kept as they are (as float32).
    """
    a = np.asarray(audio)
    if a.dtype == np.int16:
        return torch.from_numpy(a.astype(np.float32) / 32768.0)
    if a.dtype == np.int32:
        return torch.from_numpy((a.astype(np.float64) / 2.0 ** 31).astype(np.float32))
    if a.dtype == np.uint8:
        return torch.from_numpy((a.astype(np.float32) - 128.0) / 128.0)
    if np.issubdtype(a.dtype, np.floating):
        return torch.from_numpy(a.astype(np.float32))
    raise EENetError(f"audio samples must be int16, int32, uint8 or float, got {a.dtype}")


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[-1] >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))


def _peak_normalise(x: torch.Tensor) -> torch.Tensor:
    peak = x.amax(dim=-1, keepdim=True)
    return torch.where(peak > 0, x / torch.where(peak > 0, peak, torch.ones_like(peak)), x)


def kws_features(audio: np.ndarray | torch.Tensor, quantize: bool = True,
                 normalize: bool = True) -> torch.Tensor:
    """The DS-CNN input of 1 s clips: ``(N, T)`` PCM -> float32 ``(N, 1, 49, 10)``.

    Args:
        audio: clips at 16 kHz, int16 PCM or floats in [-1, 1]; padded with
            zeros or cut to 16,000 samples.
        quantize: put the MFCCs on the int8 grid (:func:`quantize_mfcc`), the
            scale of ``kws12_subset``; raw MFCCs when false.
        normalize: divide each clip by its largest sample value first, as the
            MLPerf Tiny reference does.
    """
    x = _fit_length(pcm_to_float(audio), CLIP_SAMPLES)
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2:
        raise EENetError(f"audio must be (N, T) clips, got shape {tuple(x.shape)}")
    out = []
    for start in range(0, len(x), _CHUNK):
        chunk = x[start:start + _CHUNK]
        if normalize:
            chunk = _peak_normalise(chunk)
        c = mfcc(chunk)
        out.append(quantize_mfcc(c) if quantize else c.to(torch.float32))
    if not out:
        return torch.empty((0, 1, num_frames(CLIP_SAMPLES), NUM_MFCC), dtype=torch.float32)
    return torch.cat(out).unsqueeze(1).contiguous()


# ----------------------------------------------------------------------------- kws12_subset


def missing_kws12_subset(root: str | os.PathLike) -> list[str]:
    """``[SUBSET_FILE]`` when the npz is absent under ``root``, else ``[]``."""
    return [] if (Path(root) / SUBSET_FILE).is_file() else [SUBSET_FILE]


def kws12_subset_split(labels: np.ndarray, test_fraction: float = SUBSET_TEST_FRACTION,
                       seed: int = SUBSET_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: ``(train indices, test indices)``, each sorted.

    Per class (in label order) the class's indices are permuted by one
    ``numpy.random.default_rng(seed)`` and the first ``round(test_fraction * n)``
    (at least one when the class has two or more samples) go to the test split.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def load_kws12_subset(root: str | os.PathLike | None, train: bool, download: bool = False,
                      features: str = "mfcc") -> tuple[torch.Tensor, torch.Tensor]:
    """MLPerf Tiny's 1,000-clip keyword-spotting subset: a small real subset, not the data set.

    Reads ``root/speech_commands_kws12_1000.npz`` and returns its stored int8
    features as float32 ``(N, 1, 49, 10)`` and its labels (the file's 12
    classes, :data:`KWS_CLASSES`), for the train (700) or test (300) part of
    the fixed stratified split of :func:`kws12_subset_split`.

    Args:
        features: ``mfcc`` (the DS-CNN's input) or ``lfbe`` (log filter-bank energies).
    """
    name = KWS12_SUBSET.name
    base = root_path(name, root)
    if download:
        raise EENetError(f"dataset '{name}' cannot be downloaded; put {SUBSET_FILE} (numpy "
                         f"arrays from MLPerf Tiny's keyword-spotting evaluation set) in {base}")
    if features not in SUBSET_FEATURES:
        raise EENetError(f"{name} option features={features!r} is not accepted; accepted: "
                         f"{', '.join(SUBSET_FEATURES)}")
    require_files(KWS12_SUBSET, base, train)
    path = base / SUBSET_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data[features])
            y = np.asarray(data["y"], dtype=np.int64)
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise EENetError(f"could not read dataset '{name}' file {path}: "
                         f"{type(error).__name__}: {one_line(error)}") from error
    if x.ndim != 3 or len(x) != len(y):
        raise EENetError(f"could not read dataset '{name}' file {path}: {features} has shape "
                         f"{x.shape} for {len(y)} labels, expected (N, 49, 10)")
    train_idx, test_idx = kws12_subset_split(y)
    idx = train_idx if train else test_idx
    images = torch.from_numpy(x[idx].astype(np.float32)).unsqueeze(1).contiguous()
    return images, torch.from_numpy(y[idx])


KWS12_SUBSET = register_dataset(DatasetSpec(
    name="kws12_subset", loader=load_kws12_subset, num_classes=len(KWS_CLASSES), in_chans=1,
    size=(num_frames(CLIP_SAMPLES), NUM_MFCC), mean=_MFCC_MEAN, std=_MFCC_STD,
    options=("features",), missing=lambda base, train: missing_kws12_subset(base),
    downloadable=False, how_to_get="put the file there", value_range=None,
    note="small real subset (1,000 clips of MLPerf Tiny's evaluation set), not the full "
         "Speech Commands; fixed stratified 70/30 split"))


# ----------------------------------------------------------------------------- speech_commands


def missing_speech_commands(root: str | os.PathLike) -> list[str]:
    """Parts of the Speech Commands v2 layout absent under ``root`` (relative paths)."""
    base = Path(root)
    missing = [f for f in (TESTING_LIST, VALIDATION_LIST) if not (base / f).is_file()]
    noise = base / BACKGROUND_DIR
    if not noise.is_dir():
        missing.append(f"{BACKGROUND_DIR}/")
    elif not any(p.suffix.lower() == ".wav" for p in noise.iterdir()):
        missing.append(f"{BACKGROUND_DIR}/*.wav")
    missing += [f"{word}/" for word in KEYWORDS if not (base / word).is_dir()]
    return missing


def read_wav(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """A wav file as float32 mono samples in [-1, 1] and its sample rate (scipy.io.wavfile)."""
    from scipy.io import wavfile

    try:
        rate, data = wavfile.read(str(path))
    except (OSError, ValueError, EOFError) as error:
        raise EENetError(f"could not read wav file {path}: {one_line(error)}") from error
    if data.ndim == 2:  # several channels: their mean
        data = data.astype(np.float64).mean(axis=1).astype(data.dtype)
    return pcm_to_float(data), int(rate)


def _read_lists(base: Path, *names: str) -> list[set[str]]:
    out = []
    for name in names:
        with open(base / name, encoding="utf-8") as handle:
            out.append({line.strip().replace("\\", "/") for line in handle if line.strip()})
    return out


def _clip_label(word: str) -> int:
    return KEYWORDS.index(word) if word in KEYWORDS else UNKNOWN


def _keep_per_class(items: list[tuple[Any, int]],
                    max_per_class: int | None) -> list[tuple[Any, int]]:
    if max_per_class is None:
        return items
    rng = np.random.default_rng(0)
    kept = []
    for c in range(len(KWS_CLASSES)):
        members = [i for i, (_, label) in enumerate(items) if label == c]
        chosen = sorted(rng.permutation(len(members))[:max_per_class].tolist())
        kept += [members[i] for i in chosen]
    return [items[i] for i in sorted(kept)]


def _read_clip(path: Path) -> torch.Tensor:
    x, rate = read_wav(path)
    if rate != SAMPLE_RATE:
        raise EENetError(f"wav file {path} has {rate} Hz; speech_commands needs "
                         f"{SAMPLE_RATE} Hz (no resampling is done)")
    return _fit_length(x, CLIP_SAMPLES)


def _features_of(paths: Iterable[Path], quantize: bool) -> torch.Tensor:
    chunks, batch = [], []
    for path in paths:
        batch.append(_read_clip(path))
        if len(batch) == _CHUNK:
            chunks.append(kws_features(torch.stack(batch), quantize=quantize))
            batch = []
    if batch:
        chunks.append(kws_features(torch.stack(batch), quantize=quantize))
    return torch.cat(chunks) if chunks else kws_features(torch.zeros(0, CLIP_SAMPLES), quantize)


def load_speech_commands(root: str | os.PathLike | None, train: bool, download: bool = False,
                         max_per_class: int | None = None, quantize: bool = True,
                         drop_validation_list: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Google Speech Commands v2 in its own layout, as 12-class MFCC images.

    Layout under ``root`` (the extracted ``speech_commands_v0.02.tar.gz``):
    ``<word>/<speaker>_nohash_<n>.wav`` (16 kHz mono, up to 1 s),
    ``testing_list.txt`` and ``validation_list.txt`` (one ``<word>/<file>.wav``
    per line) and ``_background_noise_/*.wav`` (long noise recordings).

    Labels (:data:`KWS_CLASSES`): the ten keywords; ``unknown`` for every
    other word folder (all of them, not subsampled, as TFDS' ``speech_commands``
    that MLPerf Tiny trains on); ``silence`` for one-second windows of the
    background-noise files (non-overlapping, from the start of each file).

    Splits: the test split is the clips of ``testing_list.txt`` plus windows
    0, 10, 20, ... of every noise file; the train split is every other clip
    (``validation_list.txt`` included, since the data module carves its own
    validation split from train) plus the other noise windows. Silence windows
    of one recording thus appear in both splits (the official test archive's
    silence clips are not part of this layout).

    Features: :func:`kws_features` (MLPerf Tiny's 49x10 MFCC, on the int8 grid
    unless ``quantize=False``), float32 ``(N, 1, 49, 10)``; clips are read
    with ``scipy.io.wavfile`` and padded with zeros to 1 s.

    Args:
        max_per_class: keep at most n clips per class (a fixed choice, seed 0).
        quantize: int8-grid features (the scale of ``kws12_subset``) or raw MFCCs.
        drop_validation_list: leave the clips of ``validation_list.txt`` out of
            the train split.
    """
    name = SPEECH_COMMANDS.name
    base = root_path(name, root)
    if download:
        raise EENetError(f"dataset '{name}' cannot be downloaded here (torchvision has no "
                         f"downloader for it); get {SPEECH_COMMANDS_URL} and extract it into "
                         f"{base}")
    if max_per_class is not None and (isinstance(max_per_class, bool)
                                      or not isinstance(max_per_class, int) or max_per_class < 1):
        raise EENetError(f"{name} option max_per_class={max_per_class!r} must be a positive "
                         f"integer or null")
    require_files(SPEECH_COMMANDS, base, train)
    testing, validation = _read_lists(base, TESTING_LIST, VALIDATION_LIST)

    clips: list[tuple[Any, int]] = []
    for word in sorted(entry.name for entry in os.scandir(base)
                       if entry.is_dir() and not entry.name.startswith((".", "_"))):
        label = _clip_label(word)
        for file in sorted(f.name for f in os.scandir(base / word)
                           if f.is_file() and f.name.lower().endswith(".wav")):
            rel = f"{word}/{file}"
            in_test = rel in testing
            if in_test != (not train) or (train and drop_validation_list and rel in validation):
                continue
            clips.append((base / word / file, label))

    noise_dir = base / BACKGROUND_DIR
    for file in sorted(f.name for f in os.scandir(noise_dir)
                       if f.is_file() and f.name.lower().endswith(".wav")):
        noise, rate = read_wav(noise_dir / file)
        if rate != SAMPLE_RATE:
            raise EENetError(f"wav file {noise_dir / file} has {rate} Hz; speech_commands "
                             f"needs {SAMPLE_RATE} Hz (no resampling is done)")
        for k in range(len(noise) // CLIP_SAMPLES):
            if (k % SILENCE_TEST_EVERY == 0) == (not train):
                clips.append((noise[k * CLIP_SAMPLES:(k + 1) * CLIP_SAMPLES], SILENCE))

    clips = _keep_per_class(clips, max_per_class)
    if not clips:
        raise EENetError(f"dataset '{name}': no clip for the {'train' if train else 'test'} "
                         f"split under {base}")
    files = [(i, c) for i, (c, _) in enumerate(clips) if isinstance(c, Path)]
    windows = [(i, c) for i, (c, _) in enumerate(clips) if not isinstance(c, Path)]
    images = torch.empty((len(clips), 1, num_frames(CLIP_SAMPLES), NUM_MFCC), dtype=torch.float32)
    if files:
        images[torch.tensor([i for i, _ in files])] = _features_of([p for _, p in files], quantize)
    if windows:
        images[torch.tensor([i for i, _ in windows])] = kws_features(
            torch.stack([w for _, w in windows]), quantize=quantize)
    labels = torch.tensor([label for _, label in clips], dtype=torch.int64)
    return images, labels


SPEECH_COMMANDS = register_dataset(DatasetSpec(
    name="speech_commands", loader=load_speech_commands, num_classes=len(KWS_CLASSES),
    in_chans=1, size=(num_frames(CLIP_SAMPLES), NUM_MFCC), mean=_MFCC_MEAN, std=_MFCC_STD,
    options=("max_per_class", "quantize", "drop_validation_list"),
    missing=lambda base, train: missing_speech_commands(base), downloadable=False,
    how_to_get=f"get {SPEECH_COMMANDS_URL} and extract it there", value_range=None))
