"""eenet-export and the onnxruntime runner: same predictions and exits as the PyTorch engine."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from eenet.build import build_early_exit_network
from eenet.cost import exit_cost_table
from eenet.data.batching import make_loader
from eenet.errors import EENetError
from eenet.runs import load_run
from eenet.export import export_segments
from eenet.jobs.export import export_run
from eenet.inference import DynamicEngine
from eenet.models import ExitBlock, create_backbone
from eenet.export.onnx_runner import OnnxEarlyExitRunner
from eenet.policies import POLICIES, create_policy
from eenet.reporting.results import FORMAT_VERSION
from eenet.config import compose_config
from eenet.jobs.train import train

INPUT = (1, 16, 16)


def make_net(**exit_kw):
    torch.manual_seed(0)
    b = create_backbone("resnet20", num_classes=10, in_chans=1)
    exit_block = functools.partial(ExitBlock, **{"preblock": "plain", **exit_kw})
    net = build_early_exit_network(b, exit_block, "explicit", stages=[1, 4], input_size=INPUT)
    # random BatchNorm statistics and affine parameters, so that eval mode matters
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def random_inputs(n, seed=1):
    """Inputs of varied scale and offset, so that the exits disagree and scores spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *INPUT, generator=g)
    return x * 3 * torch.rand(n, 1, 1, 1, generator=g) + torch.randn(n, 1, 1, 1, generator=g)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread each for torch and onnxruntime: on busy cores, more threads spin and wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def runner(path):
    return OnnxEarlyExitRunner(path, threads=1)


NET = make_net()
COST = exit_cost_table(NET)
X = random_inputs(64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The test network exported once; tests write their own manifests beside its ONNX files."""
    out = tmp_path_factory.mktemp("export")
    export_segments(NET, INPUT, out, create_policy("confidence", 0.5), COST,
                    mean=[0.5], std=[0.25], input_range=(0, 1))
    return out


def with_policy(folder, name, thresholds):
    """The exported folder's manifest with another policy (the ONNX files are the same)."""
    m = json.loads((folder / "manifest.json").read_text())
    m["policy"] = {"name": name, "thresholds": [t if math.isfinite(t) else str(t)
                                                for t in thresholds]}
    path = folder / f"manifest_{name}.json"
    path.write_text(json.dumps(m))
    return path


def mixed_thresholds(name, quantiles):
    """Per-exit thresholds from the data: exit i releases about quantiles[i] of what reaches it.

    Each threshold sits in the middle of the widest gap between neighbouring
    scores near the quantile, far from every score compared with the float
    differences between ONNX and PyTorch.
    """
    policy = create_policy(name)
    with torch.no_grad():
        scores = policy.scores(NET(X))
    remaining = torch.ones(len(X), dtype=torch.bool)
    out = []
    for i, q in enumerate(quantiles):
        s = scores[remaining, i].sort().values
        k = int((1 - q) * (len(s) - 1))
        lo, hi = max(k - 4, 0), min(k + 4, len(s) - 2)
        gaps = s[lo + 1: hi + 2] - s[lo: hi + 1]
        j = lo + int(gaps.argmax())
        t = float((s[j] + s[j + 1]) / 2)
        remaining &= ~(scores[:, i] > t)
        out.append(float(policy.from_score_units(torch.tensor(t))))
    return out


def settings_for(name):
    """(thresholds, exits that must be used at batch 64)."""
    first = float(POLICIES[name]().from_score_units(torch.tensor(-math.inf)))
    never = float(POLICIES[name]().from_score_units(torch.tensor(math.inf)))
    if name == "patience":  # exit 0 always has a run of 1: it releases everyone or no one
        return [([never, 2], {1, 2}), ([1, 2], {0}), ([never, never], {2})]
    return [(mixed_thresholds(name, (0.3, 0.5)), {0, 1, 2}),
            (mixed_thresholds(name, (0.6, 0.3)), {0, 1, 2}),
            ([first, never], {0}), ([never, never], {2})]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_runner_equals_dynamic_engine(exported, name):
    for thresholds, used in settings_for(name):
        onnx = runner(with_policy(exported, name, thresholds))
        engine = DynamicEngine(NET, create_policy(name, thresholds), COST)  # idle heads skipped
        ref = engine(X)
        pred, exit_idx, cost = onnx(X.numpy())
        assert set(exit_idx.tolist()) == used, thresholds
        np.testing.assert_array_equal(exit_idx, ref.exit.numpy())
        np.testing.assert_array_equal(pred, ref.pred.numpy())
        np.testing.assert_allclose(cost, ref.cost.numpy(), rtol=1e-6)
        for i in range(16):  # batch size 1: a sample leaves or the whole batch goes on
            one = engine(X[i: i + 1])
            p1, e1, _ = onnx(X[i: i + 1].numpy())
            assert (p1[0], e1[0]) == (int(one.pred[0]), int(one.exit[0])), (thresholds, i)


class CountingSession:
    """An onnxruntime session that records the batch size of every call."""

    def __init__(self, session, name, calls):
        self.session, self.name, self.calls = session, name, calls

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feeds):
        self.calls.append((self.name, len(next(iter(feeds.values())))))
        return self.session.run(outputs, feeds)


def test_later_segments_run_on_the_remaining_samples_only(exported):
    onnx = runner(with_policy(exported, "max_prob", mixed_thresholds("max_prob", (0.3, 0.5))))
    calls = []
    onnx.pieces = [(CountingSession(s, f"segment{j}", calls), h)
                   for j, (s, h) in enumerate(onnx.pieces)]
    _, exit_idx, _ = onnx(X.numpy())
    left = [int((exit_idx == j).sum()) for j in range(3)]
    assert min(left) > 0
    assert calls == [("segment0", 64), ("segment1", 64 - left[0]), ("segment2", left[2])]
    calls.clear()
    onnx.thresholds[:] = -np.inf  # everyone leaves at exit 0: nothing else runs
    onnx(X.numpy())
    assert calls == [("segment0", 64)]


def test_idle_exits_heads_are_not_run_and_not_charged(exported):
    never = float(POLICIES["max_prob"]().from_score_units(torch.tensor(math.inf)))
    thresholds = [never, mixed_thresholds("max_prob", (0.3, 0.5))[1]]
    onnx = runner(with_policy(exported, "max_prob", thresholds))
    calls = []
    onnx.pieces = [(s, CountingSession(h, f"head{j}", calls)) for j, (s, h) in enumerate(onnx.pieces)]
    _, exit_idx, cost = onnx(X.numpy())
    assert [c[0] for c in calls] == ["head1", "head2"]  # exit 0 releases nobody: no head 0
    assert 0 not in exit_idx.tolist() and {1, 2} <= set(exit_idx.tolist())
    expected = COST.fractions_skipping([True, False])
    np.testing.assert_allclose(cost, np.array(expected)[exit_idx], rtol=1e-9)
    assert expected[1] < COST.fractions[1]
    # patience needs every head's prediction, even at an exit that releases nobody
    onnx = runner(with_policy(exported, "patience", settings_for("patience")[0][0]))
    assert onnx.idle == [False, False]


def test_runner_handles_an_empty_batch(exported):
    pred, exit_idx, cost = runner(exported)(np.zeros((0, *INPUT), np.float32))
    assert pred.shape == exit_idx.shape == cost.shape == (0,)


def run_piece(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


@pytest.mark.parametrize("exit_kw", [{}, {"preblock": "bnpool", "convs": 1,
                                          "confidence_input": "stats"}])
def test_every_onnx_piece_matches_its_pytorch_modules(exit_kw, tmp_path):
    net = make_net(**exit_kw)
    export_segments(net, INPUT, tmp_path, create_policy("max_prob", 0.5), check=False)
    m = json.loads((tmp_path / "manifest.json").read_text())
    x = random_inputs(5, seed=2)
    with torch.no_grad():
        for piece, (modules, exit_block) in zip(m["pieces"], net.segments()):
            y = torch.nn.Sequential(*modules)(x)
            (got,) = run_piece(tmp_path / piece["segment"], x)
            np.testing.assert_allclose(got, y.numpy(), atol=1e-4, rtol=1e-4)
            want = net.final_exit(y)[:1] if exit_block is None else exit_block(y)
            got = run_piece(tmp_path / piece["head"], y)
            assert len(got) == len(want) == len(piece["outputs"])
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)
            x = y
    # the batch axis is dynamic
    (out,) = run_piece(tmp_path / m["pieces"][0]["segment"], random_inputs(3))
    assert out.shape[0] == 3


def test_manifest_content(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["format"] == "eenet-onnx-segments" and m["format_version"] == 2
    assert m["input_range"] == [0.0, 1.0]
    assert m["eenet_version"] and m["opset"] == 17
    assert m["input_size"] == list(INPUT) and m["num_classes"] == 10 and m["num_exits"] == 3
    assert m["exit_stages"] == [1, 4, 8]
    assert [(p["segment"], p["head"]) for p in m["pieces"]] == [
        ("segment_0.onnx", "exit_0.onnx"), ("segment_1.onnx", "exit_1.onnx"),
        ("segment_2.onnx", "final.onnx")]
    assert m["pieces"][-1]["outputs"] == ["logits"]
    for p in m["pieces"]:
        assert (exported / p["segment"]).is_file() and (exported / p["head"]).is_file()
    assert m["policy"]["name"] == "confidence" and m["policy"]["thresholds"] == [0.5, 0.5]
    assert [e["cost_fraction"] for e in m["cost"]["exits"]] == COST.fractions
    assert [e["macs"] for e in m["cost"]["exits"]] == [e.macs for e in COST.exits]
    assert "one fused multiply-add = one flop" in m["cost"]["convention"]
    assert m["preprocessing"]["mean"] == [0.5] and m["preprocessing"]["std"] == [0.25]
    assert (exported / m["runner"]).is_file()


def test_infinite_thresholds_are_written_as_strings(tmp_path):
    policy = create_policy("entropy", [math.inf, -0.7])
    path = export_segments(NET, INPUT, tmp_path, policy, COST, check=False)
    assert json.loads(path.read_text())["policy"]["thresholds"] == ["inf", -0.7]
    assert json.loads(path.read_text())["preprocessing"] is None
    with pytest.raises(EENetError, match="3 thresholds given for 2 early exits"):
        export_segments(NET, INPUT, tmp_path, create_policy("entropy", [-1, -1, -1]), COST)


def test_the_copied_runner_needs_neither_torch_nor_eenet(exported, tmp_path):
    np.save(tmp_path / "x.npy", X.numpy())
    code = ("import sys; sys.modules['torch'] = None; sys.modules['eenet'] = None\n"
            f"sys.path.insert(0, {str(exported)!r})\n"
            "import numpy as np; from onnx_runner import OnnxEarlyExitRunner\n"
            f"r = OnnxEarlyExitRunner({str(exported / 'manifest.json')!r}, threads=1)\n"
            f"pred, ex, _ = r(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "print(pred.tolist(), ex.tolist())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = DynamicEngine(NET, create_policy("confidence", 0.5))(X)
    assert proc.stdout.strip() == f"{ref.pred.tolist()} {ref.exit.tolist()}"


def test_preprocess_uses_the_manifest_mean_and_std(exported):
    images = np.broadcast_to(np.array([0, 51, 255], dtype=np.uint8).reshape(3, 1, 1, 1),
                             (3, *INPUT))
    x = runner(exported).preprocess(images)
    np.testing.assert_allclose(x[:, 0, 0, 0], [-2.0, -1.2, 2.0], atol=1e-6)
    assert (x == x[:, :, :1, :1]).all()


# --- the command line, on a tiny trained run ------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    train(compose_config(["trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                          "logger=none", "dataset.datamodule.train_subset=300", "threads=1"],
                         output_dir=out))
    return out


def cli(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "eenet.cli.export", "threads=1", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_exports_a_run_that_the_runner_reproduces(digits_run, tmp_path):
    out = tmp_path / "deploy"
    proc = cli(f"run={digits_run}", "policy=max_prob", "thresholds=[0.6,0.7]", f"out={out}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Exported 3 exits" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["deploy"]  # nothing else is written
    m = json.loads((out / "manifest.json").read_text())
    assert m["policy"] == {"name": "max_prob", "thresholds": [0.6, 0.7],
                           "rule": m["policy"]["rule"]}
    assert m["input_size"] == [1, 8, 8] and m["preprocessing"]["mean"] == [0.3053]
    _, dm, net, cost = load_run(digits_run)
    engine = DynamicEngine(net, create_policy("max_prob", [0.6, 0.7]), cost.fractions)
    onnx = runner(out / "manifest.json")
    for x, _ in make_loader(dm.test_dataset, 128, shuffle=False):
        ref = engine(x)
        pred, exit_idx, _ = onnx(x.numpy())
        np.testing.assert_array_equal(exit_idx, ref.exit.numpy())
        np.testing.assert_array_equal(pred, ref.pred.numpy())


def test_thresholds_from_an_eval_results_file(digits_run, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"run": str(digits_run),
                                   "format_version": FORMAT_VERSION,
                                   "policy": {"name": "entropy", "thresholds": ["inf", -1.5]}}))
    cfg = compose_config([f"run={digits_run}", f"eval={results}", f"out={tmp_path / 'e'}"],
                         config_name="export")
    m = json.loads(export_run(cfg).read_text())
    assert m["policy"]["name"] == "entropy" and m["policy"]["thresholds"] == ["inf", -1.5]
    both = compose_config([f"run={digits_run}", f"eval={results}", "thresholds=0.5"],
                          config_name="export")
    with pytest.raises(EENetError, match="not both"):
        export_run(both)
    with pytest.raises(EENetError, match="give the thresholds"):
        export_run(compose_config([f"run={digits_run}"], config_name="export"))


def test_cli_bad_run_folder_is_one_line_and_code_2(tmp_path):
    proc = cli(f"run={tmp_path / 'nothing'}", "thresholds=0.5", f"out={tmp_path / 'o'}",
               cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a finished" in lines[0]


def test_cli_mistake_found_after_loading_the_run_is_one_line(digits_run, tmp_path):
    proc = cli(f"run={digits_run}", "thresholds=[0.5,0.5,0.5]", f"out={tmp_path / 'o'}",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: 3 thresholds given for 2 early exits"


def test_export_of_a_network_with_dropout_in_its_head_and_keras_same_padding(tmp_path):
    """DS-CNN: dropout before its pooling (eval mode must survive export) and Keras 'same'
    padding on a 49x10 input (the traced padding arithmetic must give 25 rows, not 24)."""
    import functools

    from eenet.build import build_early_exit_network
    from eenet.inference import DynamicEngine
    from eenet.models import create_backbone
    from eenet.models.trecx import TRecXExit
    from eenet.export.onnx_runner import OnnxEarlyExitRunner
    from eenet.policies import create_policy

    torch.manual_seed(0)
    b = create_backbone("dscnn_kws", num_classes=12, in_chans=1)
    net = build_early_exit_network(b, functools.partial(TRecXExit, width=64), "explicit",
                                   stages=[1], input_size=(1, 49, 10)).eval()
    policy = create_policy("max_prob", [0.2])
    manifest = export_segments(net, (1, 49, 10), tmp_path / "onnx", policy)  # checks every piece
    assert not net.training
    x = torch.randn(16, 1, 49, 10)
    pred, exit_idx, _ = OnnxEarlyExitRunner(manifest)(x.numpy())
    out = DynamicEngine(net, policy)(x)
    assert torch.equal(torch.as_tensor(exit_idx), out.exit)
    assert torch.equal(torch.as_tensor(pred), out.pred)
