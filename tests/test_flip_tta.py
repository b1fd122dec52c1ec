"""``experiments/cifar10_recipe/flip_tta.py``: the flip average is the mean of the image's
and its mirror's softmax, the plain figure must be the run's own, and an unfinished run or a
mismatch with results.json is one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from eenet.models.early_exit import ExitOutputs

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "cifar10_recipe" / "flip_tta.py"
spec = importlib.util.spec_from_file_location("flip_tta", SCRIPT)
flip_tta = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flip_tta)


class LeftHeavy(torch.nn.Module):
    """Two classes scored by the left and the right half of the image's first row, so that a
    mirror image swaps the scores; the third class a constant."""

    def __init__(self, third: float):
        super().__init__()
        self.third = third

    def forward(self, x):
        row = x[:, 0, 0]
        half = row.shape[-1] // 2
        logits = torch.stack([row[:, :half].sum(-1), row[:, half:].sum(-1),
                              torch.full((len(x),), self.third)], dim=-1)
        return ExitOutputs([logits], [torch.full((len(x),), float("inf"))])


def batches():
    x = torch.zeros(4, 1, 1, 4)
    x[0, 0, 0] = torch.tensor([3.0, 0, 0, 0])   # class 0 by far; mirrored class 1 by far
    x[1, 0, 0] = torch.tensor([0.0, 0, 0, 1])   # class 1 a little; mirrored class 0
    x[2, 0, 0] = torch.tensor([0.0, 0, 0, 0])   # all equal but the third
    x[3, 0, 0] = torch.tensor([2.0, 0, 0, 0])
    y = torch.tensor([0, 2, 2, 0])
    return [(x[:2], y[:2]), (x[2:], y[2:])]


def test_the_flip_average_is_the_mean_softmax_of_image_and_mirror():
    net = LeftHeavy(third=0.5)
    acc = flip_tta.accuracies(net, batches())
    # plain: sample 0 -> 0 (right), 1 -> 1 (wrong), 2 -> 2 (right, 0.5 > 0), 3 -> 0 (right)
    assert acc["plain"] == 0.75 and acc["samples"] == 4
    # averaged, by hand: sample 0 scores (3, 0, .5) and (0, 3, .5): classes 0 and 1 tie above
    # the third, argmax takes 0 (right); sample 1 (0, 1, .5) and (1, 0, .5): 0 and 1 tie at
    # (e^1 + 1) / 2 per image each, above e^.5: 0 (wrong); sample 2 the third (right);
    # sample 3 like sample 0 (right)
    probs = [torch.tensor([a, b, 0.5]).softmax(-1) for a, b in ((1.0, 0.0), (0.0, 1.0))]
    assert float((probs[0] + probs[1])[0]) > float((probs[0] + probs[1])[2])
    assert acc["flip"] == 0.75
    # a third class between the two: the average favours it where one image alone does not
    acc = flip_tta.accuracies(LeftHeavy(third=0.9), batches())
    assert acc["plain"] == 0.75  # sample 1 still goes to class 1 (1 > 0.9)
    assert acc["flip"] == 1.0    # averaged, sample 1 goes to the third class: right


class FakeData:
    def val_dataloader(self):
        return batches()

    def test_dataloader(self):
        return batches()


def fake_run(tmp_path, monkeypatch, reported: float) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(
        {"exits": [{"val_accuracy": reported, "test_accuracy": reported}]}))
    cfg = OmegaConf.create({"seed": 4, "trainer": {"max_epochs": 2}, "ema": {"decay": 0.9}})
    monkeypatch.setattr(flip_tta, "load_run", lambda r, root: (cfg, FakeData(), LeftHeavy(0.9), None))
    return run


def test_a_run_is_measured_when_its_plain_figure_is_its_own(tmp_path, monkeypatch, capsys):
    saved = []
    monkeypatch.setattr(flip_tta, "save_report", lambda *a, **k: saved.append((a, k)) or "x.json")
    assert flip_tta.main([str(fake_run(tmp_path, monkeypatch, 0.75))]) == 0
    out = saved[0][0][1]["runs"][0]
    assert (out["val_accuracy"], out["test_accuracy_flip"], out["seed"], out["ema_decay"]) == (
        0.75, 1.0, 4, 0.9)
    assert "| run | 2 | 0.9000 | 75.00 | 100.00 | 75.00 | 100.00 | 2.0 |" in capsys.readouterr().out


def test_a_run_whose_figure_differs_or_still_trains_is_one_line(tmp_path, monkeypatch, capsys):
    saved = []
    monkeypatch.setattr(flip_tta, "save_report", lambda *a, **k: saved.append(a) or "x.json")
    run = fake_run(tmp_path, monkeypatch, 0.25)  # two samples of four away from the 0.75 measured
    assert flip_tta.main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not the 0.2500 of its results.json" in err
    (run / "INCOMPLETE").write_text("")
    assert flip_tta.main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "still being trained" in err
    (run / "INCOMPLETE").unlink()
    (run / "results.json").write_text("{not json")
    assert flip_tta.main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "results.json cannot be read" in err
    assert saved == []  # nothing saved for a refused run
