"""Keyword-spotting data (MFCC front end, kws12_subset, speech_commands) and Visual Wake Words.

The keyword-spotting subset is read from conftest's ``data_root``: the real 1,000-clip file of
``../shared/data`` when present, else a small one written in its format
(``small_data.write_kws12_subset``); the checks that need MLPerf Tiny's own file say so when
they skip. Speech Commands and VWW folders are written per test (``tests/small_data.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from small_data import SR, make_speech_commands, make_vww, write_wav

from eenet.data import (ClassificationDataModule, dataset_info, list_datasets, load_split,
                        missing_files)
from eenet.data.audio import (KWS_CLASSES, SUBSET_FILE, kws12_subset_split, kws_features,
                              mel_weight_matrix, mfcc, num_frames, quantize_mfcc)
from eenet.errors import EENetError

KWS_MEAN, KWS_STD = [80.0572], [15.6136]  # conf/dataset/kws12_subset.yaml


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def npz_root(data_root) -> Path:
    """The folder of the keyword-spotting subset file (real or small)."""
    return data_root.path


@pytest.fixture(scope="module")
def npz(npz_root):
    with np.load(npz_root / SUBSET_FILE) as data:
        return {k: data[k] for k in ("audio", "mfcc", "lfbe", "y")}


@pytest.fixture
def real_npz(data_root, npz):
    """The arrays of MLPerf Tiny's own file, or skip: the small file's MFCCs are eenet's own."""
    if not data_root.is_real("kws12_subset"):
        pytest.skip(f"needs the real {SUBSET_FILE} in {data_root.shared} (absent; the small one "
                    f"written instead holds eenet's own MFCCs, not MLPerf Tiny's)")
    return npz


def test_registered():
    assert {"kws12_subset", "speech_commands", "vww"} <= set(list_datasets())
    assert dataset_info("kws12_subset")["size"] == (49, 10)
    assert "subset" in dataset_info("kws12_subset")["note"]
    assert dataset_info("speech_commands")["num_classes"] == 12
    assert dataset_info("vww") == {"num_classes": 2, "in_chans": 3, "size": (96, 96)}


# ----------------------------------------------------------------------------- MFCC front end


def reference_mfcc(x: np.ndarray) -> np.ndarray:
    """The module docstring's formulas, written with plain loops in float64."""
    window, stride, n_fft, n_mel, n_mfcc = 480, 320, 512, 40, 10
    mel = lambda hz: 1127.0 * np.log(1.0 + hz / 700.0)  # noqa: E731
    edges = np.linspace(mel(20.0), mel(4000.0), n_mel + 2)
    weights = np.zeros((n_fft // 2 + 1, n_mel))
    for f in range(1, n_fft // 2 + 1):
        m = mel(f * SR / n_fft)
        for j in range(n_mel):
            low, center, up = edges[j], edges[j + 1], edges[j + 2]
            weights[f, j] = max(0.0, min((m - low) / (center - low), (up - m) / (up - center)))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
    frames = 1 + (len(x) - window) // stride
    out = np.zeros((frames, n_mfcc))
    for t in range(frames):
        spectrum = np.abs(np.fft.rfft(x[t * stride:t * stride + window] * hann, n_fft))
        log_mel = np.log(spectrum @ weights + 1e-6)
        for k in range(n_mfcc):
            out[t, k] = np.sqrt(2.0 / n_mel) * sum(
                log_mel[j] * np.cos(np.pi * k * (2 * j + 1) / (2 * n_mel)) for j in range(n_mel))
    return out


def sine(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)


def test_mfcc_equals_the_formulas_on_a_sine():
    x = sine(440.0) + 0.1 * sine(1234.0)
    expected = reference_mfcc(x)
    assert expected.shape == (49, 10)
    got = mfcc(torch.from_numpy(x))  # float64 in, float64 out
    assert got.shape == (49, 10) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-9)
    # float32: the FFT's rounding floor shows in the log of nearly empty mel bands of a pure
    # tone; 0.02 is far below one step (0.58) of the int8 grid
    got32 = mfcc(torch.from_numpy(x).float())
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=2e-2)


def test_frames_and_batch_shapes():
    assert num_frames(16000) == 49 and num_frames(479) == 0 and num_frames(480) == 1
    batch = torch.from_numpy(np.stack([sine(300.0), sine(2000.0)]))
    assert mfcc(batch).shape == (2, 49, 10)
    assert mfcc(torch.from_numpy(sine(300.0, 0.5))).shape == (num_frames(8000), 10)
    short = (sine(500.0, 0.4) * 32767).astype(np.int16)[None]  # padded to 1 s
    assert kws_features(short).shape == (1, 1, 49, 10)
    with pytest.raises(EENetError):
        mfcc(torch.zeros(100))


def test_mel_filters_and_a_tone_lands_in_its_band():
    weights = mel_weight_matrix()
    assert weights.shape == (257, 40)
    assert torch.all(weights[0] == 0)  # no DC
    assert torch.all(weights.max(0).values > 0.5) and torch.all(weights <= 1)
    centre_bin = weights.argmax(0)  # peaks rise with the filter index
    assert torch.all(centre_bin[1:] >= centre_bin[:-1])
    spectrum = torch.fft.rfft(torch.from_numpy(sine(1000.0)[:480]), n=512).abs()
    loudest = int((spectrum @ weights).argmax())
    assert abs(int(centre_bin[loudest]) - round(1000 * 512 / SR)) <= 2


def test_quantisation_grid():
    c = torch.tensor([-200.0, -0.1, 0.0, 0.5847029089927673, 100.0])
    assert quantize_mfcc(c).tolist() == [-128.0, 82.0, 83.0, 84.0, 127.0]


@pytest.mark.data
def test_features_of_the_real_audio(real_npz):
    audio = real_npz["audio"]
    raw = kws_features(audio, quantize=False)
    assert raw.shape == (1000, 1, 49, 10) and raw.dtype == torch.float32
    assert torch.isfinite(raw).all()
    q = quantize_mfcc(raw)
    stored = torch.from_numpy(real_npz["mfcc"].astype(np.float32)).unsqueeze(1)
    # not required to match, but it does: the stored int8 MFCCs up to float rounding, except
    # values above 127 that the reference's int8 cast wrapped around (here they saturate)
    wrapped = (q == 127) & (stored < 0)
    assert (q == stored).float().mean() > 0.99
    assert torch.all(((q - stored).abs() <= 1) | wrapped)
    assert wrapped.float().mean() < 1e-4
    # the documented sizes of the real file and of its fixed split (700 / 300)
    train_idx, test_idx = kws12_subset_split(real_npz["y"])
    assert (len(train_idx), len(test_idx)) == (700, 300)


# ----------------------------------------------------------------------------- kws12_subset


def _split_sizes(y: np.ndarray) -> tuple[int, int]:
    """Train and test sizes by the documented rule: round(0.3 n) of each class's n to test."""
    n_test = sum(round(0.3 * int((y == c).sum())) for c in np.unique(y))
    return len(y) - n_test, n_test


def test_kws12_subset_shapes_and_fixed_split(npz_root, npz):
    x_train, y_train = load_split("kws12_subset", npz_root, True)
    x_test, y_test = load_split("kws12_subset", npz_root, False)
    n_train, n_test = _split_sizes(npz["y"])
    assert x_train.shape == (n_train, 1, 49, 10) and x_test.shape == (n_test, 1, 49, 10)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(y_test.tolist()) == set(range(len(KWS_CLASSES)))
    train_idx, test_idx = kws12_subset_split(npz["y"])
    assert not set(train_idx) & set(test_idx)
    assert sorted([*train_idx, *test_idx]) == list(range(len(npz["y"])))
    np.testing.assert_array_equal(x_train[:, 0].numpy(), npz["mfcc"][train_idx])
    np.testing.assert_array_equal(y_test.numpy(), npz["y"][test_idx])
    # stratified: every class about 30% in test
    for c in range(12):
        n = int((npz["y"] == c).sum())
        assert int((y_test == c).sum()) == round(0.3 * n)
    again_x, again_y = load_split("kws12_subset", npz_root, True)
    assert torch.equal(again_x, x_train) and torch.equal(again_y, y_train)
    lfbe, _ = load_split("kws12_subset", npz_root, False, features="lfbe")
    np.testing.assert_array_equal(lfbe[:, 0].numpy(), npz["lfbe"][test_idx])


def test_kws12_subset_options_and_download(npz_root):
    with pytest.raises(EENetError) as err:
        load_split("kws12_subset", npz_root, True, features="mel")
    assert "mfcc, lfbe" in one_line(err)
    with pytest.raises(EENetError) as err:
        load_split("kws12_subset", npz_root, True, image_size=[8, 8])
    assert "features" in one_line(err)
    with pytest.raises(EENetError) as err:
        load_split("kws12_subset", npz_root, True, download=True)
    assert "cannot be downloaded" in one_line(err)


def test_kws12_subset_datamodule(npz_root, npz):
    dm = ClassificationDataModule("kws12_subset", str(npz_root), mean=KWS_MEAN, std=KWS_STD,
                                  val_size=0.2, batch_size=64)
    assert dm.input_size == (1, 49, 10) and dm.num_classes == 12
    n_train, n_test = _split_sizes(npz["y"])
    n_val = round(0.2 * n_train)
    assert dm.split_sizes == {"train": n_train - n_val, "val": n_val, "test": n_test}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 49, 10) and x.dtype == torch.float32
    # the batches are the stored int8 MFCCs of the train split, normalised by the config's values
    train_idx, _ = kws12_subset_split(npz["y"])
    stored = torch.from_numpy(npz["mfcc"][train_idx].astype(np.float32)).unsqueeze(1)
    val_x = torch.cat([b for b, _ in dm.val_dataloader()])
    torch.testing.assert_close(val_x, (stored[dm.val_indices] - KWS_MEAN[0]) / KWS_STD[0])


@pytest.mark.data
def test_kws12_subset_config_normalisation_is_the_real_files(real_npz):
    """conf/dataset/kws12_subset.yaml's mean and std are, as eenet/data/audio.py documents, the
    mean and population std of every MFCC value of the 700 training clips, to 4 decimals."""
    from omegaconf import OmegaConf

    from eenet.config import config_dir

    conf = OmegaConf.load(Path(config_dir()) / "dataset" / "kws12_subset.yaml").datamodule
    train_idx, _ = kws12_subset_split(real_npz["y"])
    values = real_npz["mfcc"][train_idx].astype(np.float64)
    # written with 4 decimals: within half a unit of the last decimal
    assert abs(values.mean() - conf.mean[0]) <= 5e-5 and abs(values.std() - conf.std[0]) <= 5e-5


# ----------------------------------------------------------------------------- speech_commands


def test_speech_commands_layout(tmp_path):
    written = make_speech_commands(tmp_path)
    x_train, y_train = load_split("speech_commands", tmp_path, True)
    x_test, y_test = load_split("speech_commands", tmp_path, False)
    silence, unknown = KWS_CLASSES.index("silence"), KWS_CLASSES.index("unknown")
    # train: 10 keywords + the validation-list "yes" + bed + cat + noise windows 1, 2
    expected_train = [1] * 10 + [2, 2]
    expected_train[KWS_CLASSES.index("yes")] = 2
    assert torch.bincount(y_train, minlength=12).tolist() == expected_train
    # test: 10 keywords + bed + noise window 0
    assert torch.bincount(y_test, minlength=12).tolist() == [1] * 12
    assert x_train.shape == (len(y_train), 1, 49, 10) and x_test.shape == (12, 1, 49, 10)
    assert x_train.dtype == torch.float32 and torch.isfinite(x_train).all()
    # features are those of the files' audio (the short "go" clip padded to 1 s)
    go_test = x_test[y_test == KWS_CLASSES.index("go")]
    torch.testing.assert_close(go_test, kws_features(written["go/bb22_nohash_0.wav"][None]))
    noise = written["noise"]
    torch.testing.assert_close(x_test[y_test == silence], kws_features(noise[None, :SR]))
    torch.testing.assert_close(x_train[y_train == silence],
                               kws_features(np.stack([noise[SR:2 * SR], noise[2 * SR:3 * SR]])))
    unknown_train = x_train[y_train == unknown]
    expected = kws_features(np.stack([written["bed/aa11_nohash_0.wav"],
                                      written["cat/aa11_nohash_0.wav"]]))
    torch.testing.assert_close(unknown_train, expected)
    # raw MFCCs and the options
    raw, _ = load_split("speech_commands", tmp_path, False, quantize=False)
    assert not torch.equal(raw, x_test) and torch.isfinite(raw).all()
    _, y_dropped = load_split("speech_commands", tmp_path, True, drop_validation_list=True)
    assert len(y_dropped) == len(y_train) - 1
    _, y_one = load_split("speech_commands", tmp_path, True, max_per_class=1)
    assert torch.bincount(y_one, minlength=12).max() == 1 and len(y_one) == 12


def test_speech_commands_errors(tmp_path):
    with pytest.raises(EENetError) as err:
        load_split("speech_commands", tmp_path, True)
    message = one_line(err)
    for part in ("testing_list.txt", "validation_list.txt", "_background_noise_/", "yes/",
                 "down/", str(tmp_path)):
        assert part in message
    assert "speech_commands_v0.02.tar.gz" in message
    with pytest.raises(EENetError) as err:
        load_split("speech_commands", tmp_path, True, download=True)
    assert "speech_commands_v0.02.tar.gz" in one_line(err)
    make_speech_commands(tmp_path)
    (tmp_path / "left" / "aa11_nohash_0.wav").unlink()
    write_wav(tmp_path / "left" / "aa11_nohash_0.wav", 1.0, 300.0, rate=8000)
    with pytest.raises(EENetError) as err:
        load_split("speech_commands", tmp_path, True)
    assert "8000 Hz" in one_line(err) and "aa11_nohash_0.wav" in str(err.value)
    with pytest.raises(EENetError) as err:
        load_split("speech_commands", tmp_path, True, max_per_class=0)
    one_line(err)


def test_missing_files_name_them(tmp_path):
    assert missing_files("kws12_subset", tmp_path) == [SUBSET_FILE]
    with pytest.raises(EENetError) as err:
        load_split("kws12_subset", tmp_path, False)
    assert SUBSET_FILE in one_line(err) and str(tmp_path) in str(err.value)
    assert "testing_list.txt" in missing_files("speech_commands", tmp_path)
    assert missing_files("vww", tmp_path) == ["train/person/", "train/no_person/",
                                              "test/person/", "test/no_person/"]
    with pytest.raises(EENetError) as err:
        load_split("vww", tmp_path, True)
    assert "train/person/" in one_line(err) and "vw_coco2014_96" in str(err.value)


# ----------------------------------------------------------------------------- vww


@pytest.mark.parametrize("negative", ["no_person", "non_person"])
def test_vww_image_folder(tmp_path, negative):
    make_vww(tmp_path, negative)
    x, y = load_split("vww", tmp_path, True)
    assert x.shape == (6, 3, 96, 96) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 0, 1, 1, 1]  # no person first (alphabetical), person = 1
    assert x[y == 1].float().mean() > 150 > 80 > x[y == 0].float().mean()
    x_test, y_test = load_split("vww", tmp_path, False, image_size=[32, 32])
    assert x_test.shape == (4, 3, 32, 32) and y_test.tolist() == [0, 0, 1, 1]
    _, y_few = load_split("vww", tmp_path, True, max_per_class=1)
    assert y_few.tolist() == [0, 1]


def test_vww_errors_and_datamodule(tmp_path):
    make_vww(tmp_path)
    with pytest.raises(EENetError) as err:
        load_split("vww", tmp_path, True, download=True)
    assert "vw_coco2014_96.tar.gz" in one_line(err)
    dm = ClassificationDataModule("vww", str(tmp_path), mean=[0, 0, 0], std=[1, 1, 1],
                                  val_size=1, batch_size=4)
    assert dm.input_size == (3, 96, 96) and dm.num_classes == 2
    assert dm.split_sizes == {"train": 5, "val": 1, "test": 4}
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(EENetError) as err:
        load_split("vww", tmp_path, True)
    assert "cat" in one_line(err)


def test_vww_image_size_and_subset_decoding(tmp_path, monkeypatch):
    import eenet.data.imagefolder as imagefolder

    make_vww(tmp_path)
    seen = []
    real = imagefolder.decode_images
    monkeypatch.setattr(imagefolder, "decode_images",
                        lambda paths, channels: seen.extend(paths) or real(paths, channels))
    assert dataset_info("vww", image_size=[32, 24])["size"] == (32, 24)
    dm = ClassificationDataModule("vww", str(tmp_path), image_size=[32, 24], val_size=1,
                                  train_subset=4, test_subset=3)
    assert dm.mean == [0.0] * 3 and dm.std == [1.0] * 3  # the record's normalisation
    assert dm.input_size == (3, 32, 24) and dm.load_count == 0
    assert dm.split_sizes == {"train": 3, "val": 1, "test": 3}
    assert len(seen) == 4 + 3  # of 6 + 4 files
    full, _ = load_split("vww", tmp_path, True, image_size=[32, 24])
    assert torch.equal(dm.train_dataset.images, full[dm.train_indices])
    assert torch.equal(dm.val_dataset.images, full[dm.val_indices])
