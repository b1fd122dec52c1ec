"""``experiments/cifar10_recipe/exit_headroom.py``: the oracle is the best any exit rule can
do at a cost budget (checked against every assignment of samples to exits, heads of unused
exits skipped), and a run that is not what its results.json says is one line."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eenet.cost import CostTable
from eenet.models.early_exit import ExitOutputs
from test_calibration import cost_table  # tests/ is on sys.path

SCRIPT = (Path(__file__).resolve().parent.parent / "experiments" / "cifar10_recipe"
          / "exit_headroom.py")
spec = importlib.util.spec_from_file_location("exit_headroom", SCRIPT)
headroom = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headroom)


def table(backbone: list[int], heads: list[int], always_run=()) -> CostTable:
    """Exit i after ``backbone[i]`` MACs of the backbone (the last: the whole), its head
    ``heads[i]`` (0 for the final exit); every head before it paid."""
    return cost_table(heads, backbone, backbone=backbone[-1], always_run=always_run)


def brute_force(correct: torch.Tensor, cost: CostTable, budget: float, accuracy: float):
    """Every assignment of samples to exits; a head runs when some sample leaves through it."""
    n, m = correct.shape
    best_acc, best_cost = 0.0, None
    for assign in itertools.product(range(m), repeat=n):
        used = set(assign)
        skipped = [j not in used and j not in cost.always_run for j in range(m - 1)]
        c = cost.fractions_skipping(skipped)
        mean_cost = sum(c[a] for a in assign) / n
        acc = sum(bool(correct[b, a]) for b, a in enumerate(assign)) / n
        if mean_cost <= budget + 1e-12:
            best_acc = max(best_acc, acc)
        if acc >= accuracy - 1e-12 and (best_cost is None or mean_cost < best_cost):
            best_cost = mean_cost
    return best_acc, best_cost


@pytest.mark.parametrize("seed", range(12))
def test_the_oracle_is_the_best_assignment_of_samples_to_exits(seed):
    g = torch.Generator().manual_seed(seed)
    n, m = 5, 4
    correct = torch.rand(n, m, generator=g) < torch.tensor([0.3, 0.5, 0.6, 0.8])
    backbone = sorted(int(v) for v in torch.randint(5, 95, (m - 1,), generator=g)) + [100]
    heads = [int(v) for v in torch.randint(0, 30, (m - 1,), generator=g)] + [0]
    always = [1] if seed % 3 == 0 else []
    cost = table(backbone, heads, always)
    budget = float(torch.rand((), generator=g)) * 0.9 + 0.1
    accuracy = [0.2, 0.4, 0.6, 0.8][seed % 4]
    got = headroom.best_oracle(correct, cost, budget, accuracy)
    acc, c = brute_force(correct, cost, budget, accuracy)
    assert got["accuracy_within_budget"] == pytest.approx(acc)
    if c is None:
        assert got["cost_for_accuracy"] is None
    else:
        assert got["cost_for_accuracy"] == pytest.approx(c)


def test_skipping_an_unused_head_can_make_the_budget():
    # exit 1 is never right; its head (40 MACs) would push exit 2 over the budget
    cost = table([10, 20, 100], [0, 40, 0])
    correct = torch.tensor([[True, False, True], [False, False, True]])
    got = headroom.best_oracle(correct, cost, budget=0.6, accuracy=1.0)
    # exit 0 for sample 0 (0.10), the final exit for sample 1 (1.0 without exit 1's head)
    assert got["accuracy_within_budget"] == 1.0
    assert got["exits_used_for_accuracy"] == [0]
    assert got["cost_for_accuracy"] == pytest.approx((0.10 + 1.0) / 2)
    # with exit 1's head paid, the same assignment costs (0.10 + 1.4) / 2 = 0.75 > 0.6
    base, extra = headroom.oracle_curve(correct, cost.fractions, [True, True, True])
    assert headroom.oracle_at(base, extra, 0.6) == 0.5


def test_out_of_reach_is_none_and_zero():
    cost = table([50, 100], [10, 0])
    correct = torch.tensor([[False, False], [True, True]])
    got = headroom.best_oracle(correct, cost, budget=0.3, accuracy=0.9)
    assert got["cost_for_accuracy"] is None   # sample 0 is wrong everywhere
    assert got["accuracy_within_budget"] == 0.0  # no exit is as cheap as 0.3


class Net(torch.nn.Module):
    """Two exits over samples labelled 0, 1, 0, 1, ...: the early one always says 0 (right on
    half), the final one is always right."""

    def check_input(self, x):  # the engine's shape check: any (B, C, H, W) batch here
        assert x.dim() == 4

    def forward(self, x):
        y = torch.arange(len(x)) % 2
        early = torch.tensor([[5.0, 0.0]]).expand(len(x), 2)
        final = torch.nn.functional.one_hot(y, 2).float() * 5
        return ExitOutputs([early, final], [torch.zeros(len(x)), torch.zeros(len(x))])


class Data:
    def val_dataloader(self):
        return [(torch.zeros(8, 1, 2, 2), torch.arange(8) % 2)]

    test_dataloader = val_dataloader


def write_run(folder: Path, accuracies: list[float], val: list[float] | None = None) -> Path:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(
        {"exits": [{"val_accuracy": v, "test_accuracy": a}
                   for a, v in zip(accuracies, val or accuracies)]}))
    return folder


def test_a_run_is_measured_and_saved(tmp_path, monkeypatch, capsys):
    # val as a run made before dac6b6f may record it (another weight average): not checked
    run = write_run(tmp_path / "run", [0.5, 1.0], val=[0.9, 0.9])
    ref = write_run(tmp_path / "ref", [1.0])
    cfg = OmegaConf.create({"seed": 3, "trainer": {"max_epochs": 2}, "policy": {"name": "max_prob"}})
    cost = table([40, 100], [10, 0])
    monkeypatch.setattr(headroom, "load_run", lambda r, root: (cfg, Data(), Net(), cost))
    saved = {}
    monkeypatch.setattr(headroom, "save_report",
                        lambda script, payload, suffix, **kw: saved.update(payload) or "x.json")
    assert headroom.main([str(run), "--reference", str(ref), "--budget", "0.75",
                          "--threads", "1"]) == 0
    row = saved["runs"][0]
    # right on all: the 0s at the early exit (0.5), the 1s at the final (1.1): 0.8 on average
    assert row["test"]["cost_for_accuracy"] == pytest.approx(0.8)
    # within 0.75: every 0 at the early exit (0.5) and three of the four 1s at the final
    # (1.1): (4 * 0.5 + 3 * 1.1 + 0.5) / 8 = 0.725; a fourth would make it 0.8
    assert row["test"]["accuracy_within_budget"] == 7 / 8
    assert row["test"]["exit_accuracy"] == [0.5, 1.0]
    # a threshold cannot tell the early exit's right samples from its wrong ones (it says 0
    # alike): all leave early (right on half, cost 0.5) or none (cost 1.0, its head skipped)
    best = {t["policy"]: t for t in row["thresholds_chosen_on_test"]}
    assert list(best) == ["max_prob", "entropy", "patience"]
    assert best["max_prob"]["accuracy"] == 0.5 and best["max_prob"]["cost"] == pytest.approx(0.5)
    assert "oracle" in capsys.readouterr().out


def test_a_run_that_is_not_its_results_json_is_one_line(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", [0.9, 1.0])  # the early exit is right on half only
    ref = write_run(tmp_path / "ref", [1.0])
    cfg = OmegaConf.create({"seed": 3, "trainer": {"max_epochs": 2}, "policy": {"name": "max_prob"}})
    monkeypatch.setattr(headroom, "load_run",
                        lambda r, root: (cfg, Data(), Net(), table([40, 100], [10, 0])))
    assert headroom.main([str(run), "--reference", str(ref), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exit 0's test accuracy 0.5000 is not the 0.9000" in err[0]
    (run / "INCOMPLETE").write_text("")
    assert headroom.main([str(run), "--reference", str(ref), "--threads", "1"]) == 2
    assert "still being trained" in capsys.readouterr().err


class NearTie(torch.nn.Module):
    """Class 0 scores the sum of channel 0, class 1 the same plus channel 1's first pixel:
    an offset of 1e-9 is lost in float32 (a tie, argmax says 0) but not in float64."""

    def check_input(self, x):
        assert x.dim() == 4

    def forward(self, x):
        a = x[:, 0].flatten(1).sum(1)
        logits = torch.stack([a, a + x[:, 1, 0, 0]], 1)
        return ExitOutputs([logits], [torch.zeros(len(x))])


def near_tie_batches():
    """Six samples: two of class 1 tied in float32 (predicted 0: wrong), two clearly class 1
    and two clearly class 0 (right)."""
    x = torch.full((6, 2, 2, 2), 1 / 3)
    x[:, 1] = 0
    x[0, 1, 0, 0] = x[3, 1, 0, 0] = 1e-9  # tied in float32
    x[1, 1, 0, 0] = x[4, 1, 0, 0] = 3.0   # clearly class 1
    x[2, 1, 0, 0] = x[5, 1, 0, 0] = -3.0  # clearly class 0
    y = torch.tensor([1, 1, 0, 1, 1, 0])
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def test_rounding_fragile_counts_the_samples_float32_ties():
    net = NearTie()
    logits32 = [torch.cat([net(x).logits[0] for x, _ in near_tie_batches()])]
    assert logits32[0].argmax(1).tolist() == [0, 1, 0, 0, 1, 0]
    assert headroom.rounding_fragile(net, near_tie_batches(), logits32) == [2]


def test_a_gap_of_tied_samples_only_is_not_refused(tmp_path, monkeypatch):
    # results.json as computed where the offset counts (right on all 6); here right on 4 of 6,
    # the other two within rounding of a tie: the same run
    run = write_run(tmp_path / "run", [1.0, 1.0])
    ref = write_run(tmp_path / "ref", [1.0])
    cfg = OmegaConf.create({"seed": 3, "trainer": {"max_epochs": 2}, "policy": {"name": "max_prob"}})

    class TwoExits(NearTie):
        def forward(self, x):
            out = super().forward(x)
            return ExitOutputs(out.logits * 2, out.conf_logits * 2)

    class Data:
        def val_dataloader(self):
            return near_tie_batches()

        test_dataloader = val_dataloader

    monkeypatch.setattr(headroom, "load_run",
                        lambda r, root: (cfg, Data(), TwoExits(), table([40, 100], [10, 0])))
    saved = {}
    monkeypatch.setattr(headroom, "save_report",
                        lambda script, payload, suffix, **kw: saved.update(payload) or "x.json")
    assert headroom.main([str(run), "--reference", str(ref), "--threads", "1"]) == 0
    test = saved["runs"][0]["test"]
    assert test["samples_apart_from_results_json"] == [2, 2]
    assert test["samples_within_rounding_of_a_tie"] == [2, 2]
    # one sample more apart than the ties explain is refused (right on 1 of 6, here 4)
    write_run(tmp_path / "run2", [1.0, 1 / 6])
    assert headroom.main([str(tmp_path / "run2"), "--reference", str(ref), "--threads", "1"]) == 2
