"""Data sets checked against their configuration: one clear line, exit code 2, nothing written.

Every row writes a small data set in its own on-disk layout under ``tmp_path``
(image folders as PNG files, CIFAR-10 as python pickle batches, Visual Wake
Words and Speech Commands in theirs), composes the real ``conf/train.yaml``
and runs the real job (``run_job(train, cfg)``, what ``eenet-train`` calls after
Hydra composed the config). It must exit with code 2 and one ``error: ...``
line naming the problem, and leave everything under ``tmp_path`` (the data and
the output folder of an earlier run) byte-identical, with nothing added.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eenet.cli.common import run_job
from eenet.config import compose_config
from eenet.jobs.train import train
from folder_state import snapshot  # tests/ is on sys.path
from small_data import make_speech_commands, make_vww, write_cifar10, write_imagefolder

REPO = Path(__file__).resolve().parents[1]
QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
         "checkpoint.enabled=false", "anytime=false"]
CLASSES = ("ant", "bee", "cat")


def earlier_run(out: Path) -> None:
    """The output folder of an earlier run, which a refused run must not touch."""
    out.mkdir(parents=True)
    (out / "results.json").write_text('{"earlier": true}\n')
    (out / "model.pt").write_bytes(b"weights of an earlier run")


# ----------------------------------------------------------------------------- the data sets


def folders(root: Path, train=CLASSES, test=CLASSES) -> Path:
    """An image folder whose train/ and test/ hold the given class folders, 2 PNGs each."""
    write_imagefolder(root, classes=sorted(set(train) | set(test)), per_class=2)
    for split, keep in (("train", train), ("test", test)):
        for extra in set(train) | set(test):
            if extra not in keep:
                shutil.rmtree(root / split / extra)
    return root


def imagefolder(root: Path, num_classes: int, **split_classes) -> list[str]:
    folders(root / "if", **split_classes)
    return ["dataset=imagefolder", f"dataset.datamodule.root={root / 'if'}",
            f"dataset.num_classes={num_classes}", "dataset.image_size=[8,8]"]


def missing_class_in_test_split(root):
    return imagefolder(root, 3, test=("ant", "cat"))


def train_has_an_extra_class(root):
    return imagefolder(root, 3, train=(*CLASSES, "dog"))


def extra_class_in_test_split(root):
    return imagefolder(root, 3, test=(*CLASSES, "zebra"))


def three_classes_num_classes_10(root):
    return imagefolder(root, 10)


def empty_test_class_folder(root):
    overrides = imagefolder(root, 3)
    for image in (root / "if" / "test" / "bee").iterdir():
        image.unlink()
    return overrides


def val_folder_instead_of_test(root):
    overrides = imagefolder(root, 3)
    (root / "if" / "test").rename(root / "if" / "val")  # ImageNet's train/ + val/ layout
    return overrides


def cifar10(root: Path, num_classes: int = 10) -> list[str]:
    write_cifar10(root / "data")
    return ["dataset=cifar10", f"data_root={root / 'data'}", f"dataset.num_classes={num_classes}",
            "dataset.datamodule.val_size=4"]


def cifar10_num_classes_100(root):
    return cifar10(root, 100)


def cifar10_label_out_of_range(root):
    overrides = cifar10(root)
    batch = root / "data" / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.loads(batch.read_bytes())
    entry["labels"][1] = 10  # a foreign or damaged file: CIFAR-10 labels are 0..9
    batch.write_bytes(pickle.dumps(entry))
    return overrides


def vww_num_classes_3(root):
    make_vww(root / "data" / "vww")
    return ["dataset=vww", f"data_root={root / 'data'}", "dataset.num_classes=3"]


def speech_commands_35_words(root):
    make_speech_commands(root / "data" / "speech_commands")  # the 35 words of v2 are not the 12 classes
    return ["dataset=speech_commands", f"data_root={root / 'data'}", "dataset.num_classes=35"]


def val_size_0(root):
    return ["dataset.datamodule.val_size=0"]


def val_size_above_the_training_split(root):
    return ["dataset.datamodule.val_size=5000"]  # digits: 1,437 training samples


def val_size_equal_to_train_subset(root):
    return ["dataset.datamodule.train_subset=100", "dataset.datamodule.val_size=100"]


def root_a_symlink_loop(root):
    (root / "loop").symlink_to(root / "loop")
    return ["dataset=imagefolder", f"dataset.datamodule.root={root / 'loop'}", "dataset.num_classes=3"]


def data_root_a_file_mnist(root):
    (root / "data").write_text("not a folder")
    return ["dataset=mnist", f"data_root={root / 'data'}"]


def data_root_a_file_vww(root):  # the data set's root is data_root/vww: a parent is the file
    (root / "data").write_text("not a folder")
    return ["dataset=vww", f"data_root={root / 'data'}"]


ROWS = [
    (missing_class_in_test_split, ["must hold the same class folders", "class folder(s) bee missing from {r}/if/test"]),
    (train_has_an_extra_class, ["class folder(s) dog missing from {r}/if/test"]),
    (extra_class_in_test_split, ["class folder(s) zebra in {r}/if/test but not in {r}/if/train"]),
    (three_classes_num_classes_10,
     ["3 class folder(s) found in {r}/if/train (ant, bee, cat) but num_classes=10",
      "set dataset.num_classes=3"]),
    (empty_test_class_folder, ["class folder(s) bee of {r}/if/test hold no image file"]),
    (val_folder_instead_of_test, ["missing test/ (there is a val/", "under {r}/if"]),
    (cifar10_num_classes_100, ["dataset 'cifar10' has 10 classes but num_classes=100"]),
    (cifar10_label_out_of_range, ["dataset 'cifar10': the files under {r}/data hold label(s) 10 "
                                  "outside 0..9"]),
    (vww_num_classes_3, ["dataset 'vww' has 2 classes but num_classes=3"]),
    (speech_commands_35_words, ["dataset 'speech_commands' has 12 classes but num_classes=35"]),
    # refused by the option checks of the composed config (eenet/config_checks.py) or, with
    # the actual sizes, where the data is split (test_the_split_itself_refuses_... below)
    (val_size_0, ["val_size=0"]),
    (val_size_above_the_training_split,
     ["val_size=5000 is out of range for a training split of 1437 sample(s) of dataset 'digits'"]),
    (val_size_equal_to_train_subset, ["val_size=100", "train_subset=100"]),
    (root_a_symlink_loop, ["dataset 'imagefolder': root {r}/loop is a symlink loop"]),
    # data_root itself is checked first, with the options (eenet.config_checks)
    (data_root_a_file_mnist, ["data_root {r}/data is a file, not a folder"]),
    (data_root_a_file_vww, ["data_root {r}/data is a file, not a folder"]),
]


def expect_refused(cfg, capsys) -> str:
    """``run_job(train, cfg)`` exits 2 with one ``error:`` line and no traceback; the line."""
    with pytest.raises(SystemExit) as code:
        run_job(train, cfg)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("make,fragments", ROWS, ids=[r[0].__name__ for r in ROWS])
def test_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, make, fragments):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    overrides = make(tmp_path)
    earlier_run(tmp_path / "run")
    before = snapshot(tmp_path)
    cfg = compose_config([*QUICK, *overrides], output_dir=tmp_path / "run")
    line = expect_refused(cfg, capsys)
    for fragment in fragments:
        assert fragment.format(r=tmp_path) in line, line
    assert snapshot(tmp_path) == before


def test_data_root_a_symlink_loop(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    earlier_run(tmp_path / "run")
    before = snapshot(tmp_path)
    cfg = compose_config([*QUICK, "dataset=mnist", f"data_root={tmp_path / 'loop'}"],
                         output_dir=tmp_path / "run")
    assert f"{tmp_path / 'loop'} is a symlink loop" in expect_refused(cfg, capsys)
    assert snapshot(tmp_path) == before


UNREADABLE = """
import sys
from eenet.cli.common import run_job
from eenet.config import compose_config
from eenet.jobs.train import train
run_job(train, compose_config(sys.argv[2:], output_dir=sys.argv[1]))
"""


def test_unreadable_root(tmp_path):
    """A folder that cannot be listed; root ignores permission bits, so the job then runs in a
    process without the capabilities that let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    folders(tmp_path / "if")
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is absent: cannot drop the "
                        "capabilities that ignore permission bits")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    earlier_run(tmp_path / "run")
    before = snapshot(tmp_path)
    (tmp_path / "if").chmod(0)
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", UNREADABLE, str(tmp_path / "run"), *QUICK,
             "dataset=imagefolder", f"dataset.datamodule.root={tmp_path / 'if'}",
             "dataset.num_classes=3"],
            capture_output=True, text=True, timeout=300, cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""})
    finally:
        (tmp_path / "if").chmod(0o755)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"dataset 'imagefolder': root {tmp_path / 'if'} cannot be read (permission denied)" in err[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kwargs,message", [
    ({"val_size": 0}, "val_size=0 is out of range: the validation split picks the checkpoint"),
    ({"val_size": 100, "train_subset": 100},
     "val_size=100 is out of range for a training split of 100 sample(s) (train_subset=100) of "
     "dataset 'digits': it would leave no sample to train on; give a count below 100"),
    ({"val_size": 0.5, "train_subset": 1},
     "a training split of 1 sample(s) (train_subset=1) of dataset 'digits' cannot give both a "
     "validation and a training sample"),
])
def test_the_split_itself_refuses_a_validation_split_it_cannot_carve(kwargs, message):
    """The data module's own check, for callers without a composed config (the library)."""
    from eenet.data import ClassificationDataModule
    from eenet.errors import EENetError

    with pytest.raises(EENetError) as err:
        ClassificationDataModule("digits", **kwargs).setup("fit")
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- what is accepted


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "eenet" / "conf" / "dataset").glob("*.yaml")))
def test_every_dataset_config_passes_num_classes(tmp_path, name):
    cfg = compose_config([f"dataset={name}"], output_dir=tmp_path / "run")
    assert cfg.dataset.datamodule.num_classes == cfg.dataset.num_classes


def test_the_same_data_sets_with_the_right_settings_load(tmp_path):
    """The rows' data, written the same way but configured right, load without a word."""
    from eenet.config import instantiate

    for overrides, sizes in (
            (imagefolder(tmp_path / "a", 3), {"train": 5, "val": 1, "test": 6}),
            (cifar10(tmp_path / "c"), {"train": 16, "val": 4, "test": 4})):
        cfg = compose_config(overrides, output_dir=tmp_path / "run")
        dm = instantiate(cfg.dataset.datamodule, "dataset")
        dm.prepare_data()
        assert dm.split_sizes == sizes and dm.num_classes == cfg.dataset.num_classes
    assert not (tmp_path / "run").exists()


def test_an_image_folder_trains_with_its_class_count(tmp_path):
    """The real job on 3 class folders with num_classes=3: the checks pass, the run is written."""
    cfg = compose_config([*QUICK, *imagefolder(tmp_path, 3)], output_dir=tmp_path / "run")
    results, objects = run_job(train, cfg)
    assert objects["net"].num_classes == 3 and results["num_classes"] == 3
    assert (tmp_path / "run" / "config.yaml").is_file()
