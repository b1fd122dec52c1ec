"""eenet-export and the onnxruntime runner: same predictions and exits as the PyTorch engine."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
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
from eenet.export.onnx_runner import OnnxEarlyExitRunner, RunnerError
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
        # both are (macs - skipped heads) / backbone_macs, one correctly rounded float64
        # division of the same integers; the engine keeps it in float32: equal once rounded so
        np.testing.assert_array_equal(cost.astype(np.float32), ref.cost.numpy())
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
    # the same integers (MACs minus the skipped heads) divided once in float64 on both sides
    np.testing.assert_array_equal(cost, np.array(expected)[exit_idx])
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


#: ONNX pieces may differ from PyTorch by this many times PyTorch's own relative float32
#: error (see test_every_onnx_piece_matches_its_pytorch_modules): both are float32
#: computations of the same function (2x), onnxruntime folds BatchNorm into rounded
#: constants and sums in another order (2x), and a maximum over a different draw of
#: roundings may land higher (2x). Measured: at most 2.9x (3 inputs x 2 exit designs).
ONNX_FLOOR_FACTOR = 8


@pytest.mark.parametrize("exit_kw", [{}, {"preblock": "bnpool", "convs": 1,
                                          "confidence_input": "stats"}])
def test_every_onnx_piece_matches_its_pytorch_modules(exit_kw, tmp_path):
    """Each piece, fed PyTorch's input for it, gives PyTorch's outputs to within float32 noise.

    The noise floor is measured here: the largest relative error of PyTorch's float32
    outputs against the same modules in float64, over every output of every piece (a
    relative floor, since a shallow head alone can happen to round almost exactly);
    each output may differ by ONNX_FLOOR_FACTOR times that, relative to its magnitude.
    """
    net = make_net(**exit_kw)
    net64 = copy.deepcopy(net).double()
    export_segments(net, INPUT, tmp_path, create_policy("max_prob", 0.5), check=False)
    m = json.loads((tmp_path / "manifest.json").read_text())
    x = random_inputs(5, seed=2)
    compared = []  # (piece file, ONNX output, PyTorch float32, PyTorch float64)
    with torch.no_grad():
        for piece, (modules, exit_block), (modules64, exit64) in zip(
                m["pieces"], net.segments(), net64.segments()):
            y = torch.nn.Sequential(*modules)(x)
            (got,) = run_piece(tmp_path / piece["segment"], x)
            compared.append((piece["segment"], got, y, torch.nn.Sequential(*modules64)(x.double())))
            want = net.final_exit(y)[:1] if exit_block is None else exit_block(y)
            want64 = net64.final_exit(y.double())[:1] if exit64 is None else exit64(y.double())
            got = run_piece(tmp_path / piece["head"], y)
            assert len(got) == len(want) == len(piece["outputs"])
            compared += [(piece["head"], g, w, w64) for g, w, w64 in zip(got, want, want64)]
            x = y
    floor = max(float((w.double() - w64).abs().max() / w64.abs().max()) for *_, w, w64 in compared)
    # float32 rounding (measured 7-33 units of roundoff 2**-24), not a mismatch between the
    # two networks, which would make the tolerance below meaningless
    assert 0 < floor < 2 ** -24 * 2 ** 10
    for name, got, want, want64 in compared:
        tol = ONNX_FLOOR_FACTOR * floor * float(want64.abs().max())
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=tol, err_msg=name)
    # the batch axis is dynamic
    (out,) = run_piece(tmp_path / m["pieces"][0]["segment"], random_inputs(3))
    assert out.shape[0] == 3


def test_manifest_content(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["format"] == "eenet-onnx-segments" and m["format_version"] == 3
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
    # (v / 255 - 0.5) / 0.25 in float32: the division by 255 and the subtraction round (each
    # by at most 2**-24 of a value <= 1), dividing by 0.25 is exact (a power of 2):
    # at most 2 * 2**-24 / 0.25 = 2**-21 from the exact values
    np.testing.assert_allclose(x[:, 0, 0, 0], [-2.0, -1.2, 2.0], rtol=0, atol=2 ** -21)
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


# --- the runner's error paths that tests/test_bad_input_engine.py and test_safe_runs.py leave out

def one_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def edited_copy(exported, tmp_path, edit, name="manifest.json"):
    """A copy of the export whose manifest ``edit(manifest)`` changed; returns the manifest path."""
    folder = tmp_path / "deploy"
    if not folder.exists():
        shutil.copytree(exported, folder)
    m = json.loads((exported / "manifest.json").read_text())
    edit(m)
    (folder / name).write_text(json.dumps(m))
    return folder / name


def test_runner_missing_manifest_is_one_line_naming_the_file(exported, tmp_path):
    (tmp_path / "empty").mkdir()
    for given, missing in ((tmp_path / "nothing", tmp_path / "nothing"),
                           (tmp_path / "empty", tmp_path / "empty" / "manifest.json"),
                           (exported / "other.json", exported / "other.json")):
        with pytest.raises(FileNotFoundError) as err:
            OnnxEarlyExitRunner(given, threads=1)
        assert one_line(err).endswith(f"No such file or directory: '{missing}'")


def test_runner_refuses_a_manifest_that_is_not_an_object(exported, tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err) == f"{path} is not an eenet-export manifest (not a JSON object)"


@pytest.mark.parametrize("name,message", [
    ("sub/segment_1.onnx", "is not a plain file name in the export folder"),
    ("", "is not a plain file name in the export folder"),
    (".", "is not a plain file name in the export folder"),
    (None, "is not a plain file name in the export folder"),
    (3, "is not a plain file name in the export folder"),
    ("missing.onnx", "is not a file in the export folder"),
    ("sub", "is not a file in the export folder")])
def test_runner_refuses_bad_piece_names_before_opening_any_model(exported, tmp_path, monkeypatch,
                                                                 name, message):
    """The second segment's name is wrong; not even the first piece, whose name is right, is
    opened. ``sub/segment_1.onnx`` exists (a folder part inside the folder is still refused)."""
    path = edited_copy(exported, tmp_path, lambda m: m["pieces"][1].update(segment=name))
    (path.parent / "sub").mkdir()
    shutil.copyfile(exported / "segment_1.onnx", path.parent / "sub" / "segment_1.onnx")
    opened = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda f, *a, **k: opened.append(f) or real(f, *a, **k))
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err) == f"{path}: piece {name!r} {message} {path.parent}" + (
        "; refusing to open it" if "plain" in message else "")
    assert opened == []
    OnnxEarlyExitRunner(edited_copy(exported, tmp_path, lambda m: None), threads=1)  # the copy loads
    assert len(opened) == 6  # and the counting wrapper does count: 3 segments and 3 heads


@pytest.mark.parametrize("policy,message", [
    ({"name": "softmax", "thresholds": [0.5, 0.5]},
     "{path}: policy.name is 'softmax'; expected one of confidence, max_prob, entropy, patience"),
    ({"name": "max_prob", "thresholds": [0.5]}, "{path}: policy.thresholds is [0.5]; expected a "
     "list of 2 thresholds, one per early exit (numbers, or \"inf\" / \"-inf\" as strings)"),
    ({"name": "max_prob", "thresholds": [0.5, 0.5, 0.5]}, "{path}: policy.thresholds is "
     "[0.5, 0.5, 0.5]; expected a list of 2 thresholds, one per early exit (numbers, or \"inf\" / "
     "\"-inf\" as strings)"),
    ({"name": "max_prob", "thresholds": ["nan", 0.5]},
     "{path}: manifest max_prob threshold nan is out of range: accepted 0 < t < 1, inf or -inf"),
    ({"name": "confidence", "thresholds": [0.5, 1]},
     "{path}: manifest confidence threshold 1 is out of range: accepted 0 < t < 1, inf or -inf"),
    ({"name": "confidence", "thresholds": [0, 0.5]},
     "{path}: manifest confidence threshold 0 is out of range: accepted 0 < t < 1, inf or -inf"),
    ({"name": "entropy", "thresholds": [0, -1]},
     "{path}: manifest entropy threshold 0 is out of range: accepted t < 0 (leave when -H > t), inf or -inf"),
    ({"name": "patience", "thresholds": ["nan", 2]},
     "{path}: manifest patience threshold nan is out of range: accepted a whole number of exits >= 1 or inf")])
def test_runner_refuses_bad_policies_and_thresholds(exported, tmp_path, policy, message):
    path = edited_copy(exported, tmp_path, lambda m: m.update(policy=policy))
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err) == message.format(path=path)


@pytest.mark.parametrize("edit", ["not json", "no pieces", "no policy", "no input_size",
                                  "no thresholds", "thresholds 'abc'", "threshold null",
                                  "thresholds not a list"])
def test_runner_names_the_manifest_for_every_malformed_manifest(exported, tmp_path, edit):
    edits = {"no pieces": lambda m: m.pop("pieces"), "no policy": lambda m: m.pop("policy"),
             "no input_size": lambda m: m.pop("input_size"),
             "no thresholds": lambda m: m["policy"].pop("thresholds"),
             "thresholds 'abc'": lambda m: m["policy"].update(thresholds=["abc", 0.5]),
             "threshold null": lambda m: m["policy"].update(thresholds=[None, 0.5]),
             "thresholds not a list": lambda m: m["policy"].update(thresholds=0.5)}
    path = edited_copy(exported, tmp_path, edits.get(edit, lambda m: None))
    if edit == "not json":
        path.write_text(path.read_text()[:-1])  # the closing brace lost
    try:
        OnnxEarlyExitRunner(path, threads=1)
    except Exception as err:  # noqa: BLE001 - what kind of error is the point
        assert isinstance(err, RunnerError) and str(path) in str(err) and "\n" not in str(err), \
            f"{type(err).__name__}: {err}"
    else:
        raise AssertionError("the malformed manifest was accepted")


@pytest.mark.parametrize("dtype", [np.complex64, object, np.str_])
def test_runner_refuses_non_numeric_input(exported, dtype):
    x = X.numpy().astype(dtype)
    with pytest.raises(RunnerError) as err:
        runner(exported)(x)
    assert one_line(err) == (f"input of dtype {x.dtype} is not accepted (float16/32/64): "
                             "pass float32 values")


def test_runner_refuses_a_ragged_list_in_its_own_words(exported):
    try:
        runner(exported)([[1.0], [1.0, 2.0]])
    except ValueError as err:
        assert isinstance(err, RunnerError), f"{type(err).__name__}: {err}"
    else:
        raise AssertionError("a ragged list was accepted")


def test_runner_refuses_a_ragged_list_naming_the_shape_it_takes(exported):
    with pytest.raises(RunnerError) as err:
        runner(exported)([[1.0], [1.0, 2.0]])
    assert one_line(err) == ("input is a list that is not one array of numbers (nested lists of "
                             "different lengths, or items that are not numbers): pass an array of "
                             f"shape (batch, {', '.join(map(str, INPUT))}) (NCHW)")
    with pytest.raises(RunnerError, match=r"^images is a list that is not one array of numbers"):
        runner(exported).preprocess([[[[0.5]]], [[[0.5, 0.5]]]])


def test_runner_refuses_a_manifest_that_is_not_json_or_not_text(exported, tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text((exported / "manifest.json").read_text()[:-2])  # the closing brace lost
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err).startswith(f"{path} is not an eenet-export manifest (not valid JSON: ")
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err) == f"{path} is not an eenet-export manifest (not UTF-8 text)"


def _set(*keys_value):
    """An edit that sets m[k0][k1]...[kn] = value (``_POP`` as the value: removes the key)."""
    *keys, value = keys_value

    def edit(m):
        for k in keys[:-1]:
            m = m[k]
        if value is _POP:
            m.pop(keys[-1])
        else:
            m[keys[-1]] = value
    return edit


_POP = object()
_THRESHOLDS = ('a list of 2 thresholds, one per early exit (numbers, or "inf" / "-inf" as '
               'strings)')
_FUSED = {"fused": "fused_0.onnx", "fused_inputs": ["x"], "fused_outputs": ["logits"]}


@pytest.mark.parametrize("edit,message", [
    (_set("pieces", {}), "pieces is {}; expected a list of at least one piece object "
                         "({segment, head, ...}, in running order)"),
    (_set("pieces", []), "pieces is []; expected a list of at least one piece object "
                         "({segment, head, ...}, in running order)"),
    (_set("pieces", 1, "segment_1.onnx"),
     "pieces[1] is 'segment_1.onnx'; expected a piece object ({segment, head, ...})"),
    (_set("pieces", 2, "head", _POP),
     "pieces[2].head is missing; expected a plain file name in the export folder"),
    (_set("pieces", 0, "fused", "../fused_0.onnx"),
     "pieces[0].fused is '../fused_0.onnx'; expected a plain file name in the export folder "
     "(with fused_inputs and fused_outputs)"),
    (_set("pieces", 0, {"segment": "segment_0.onnx", "head": "exit_0.onnx", "fused_inputs": ["x"],
                        "fused_outputs": ["logits"]}),
     "pieces[0].fused is missing; expected a plain file name in the export folder (with "
     "fused_inputs and fused_outputs)"),
    (_set("pieces", 1, {"segment": "segment_1.onnx", "head": "exit_1.onnx", **_FUSED,
                        "fused_outputs": "logits"}),
     "pieces[1].fused_outputs is 'logits'; expected a list of value names (non-empty strings), "
     "given with fused"),
    (_set("pieces", 1, {"segment": "segment_1.onnx", "head": "exit_1.onnx", **_FUSED,
                        "fused_inputs": ["x", ""]}),
     "pieces[1].fused_inputs is ['x', '']; expected a list of value names (non-empty strings), "
     "given with fused"),
    (_set("policy", "max_prob"),
     "policy is 'max_prob'; expected an object {name, thresholds[, temperatures]}"),
    (_set("policy", "name", _POP),
     "policy.name is missing; expected one of confidence, max_prob, entropy, patience"),
    (_set("policy", "name", ["max_prob"]),
     "policy.name is ['max_prob']; expected one of confidence, max_prob, entropy, patience"),
    (_set("policy", "thresholds", _POP), f"policy.thresholds is missing; expected {_THRESHOLDS}"),
    (_set("policy", "thresholds", 0.5), f"policy.thresholds is 0.5; expected {_THRESHOLDS}"),
    (_set("policy", "thresholds", [0.5, None]),
     'policy.thresholds[1] is None; expected a number, or "inf" / "-inf" as a string'),
    (_set("policy", "thresholds", [True, 0.5]),
     'policy.thresholds[0] is True; expected a number, or "inf" / "-inf" as a string'),
    (_set("policy", "thresholds", ["abc", 0.5]),
     "policy.thresholds[0] is 'abc'; expected a number, or \"inf\" / \"-inf\" as a string"),
    (_set("policy", {"name": "max_prob", "thresholds": [0.5, 0.5], "temperatures": [1.0, 1.0]}),
     "policy temperatures must be 3 finite numbers > 0 (one per exit, the final exit included), "
     "got [1.0, 1.0]"),
    (_set("input_size", _POP), "input_size is missing; expected [C, H, W], three whole numbers >= 1"),
    (_set("input_size", [8, 8]), "input_size is [8, 8]; expected [C, H, W], three whole numbers >= 1"),
    (_set("input_size", [1, 8.0, 8]),
     "input_size is [1, 8.0, 8]; expected [C, H, W], three whole numbers >= 1"),
    (_set("input_size", [1, 0, 8]),
     "input_size is [1, 0, 8]; expected [C, H, W], three whole numbers >= 1"),
    (_set("num_classes", 0), "num_classes is 0; expected a whole number >= 1"),
    (_set("num_classes", "10"), "num_classes is '10'; expected a whole number >= 1"),
    (_set("input", 3), "input is 3; expected the name of the network's input, a non-empty string"),
    (_set("input_range", [1.0, 0.0]),
     "input_range is [1.0, 0.0]; expected null or [lo, hi], finite numbers, lo < hi"),
    (_set("input_range", [0, "1"]),
     "input_range is [0, '1']; expected null or [lo, hi], finite numbers, lo < hi"),
    (_set("input_range", [0, math.nan]),
     "input_range is [0, nan]; expected null or [lo, hi], finite numbers, lo < hi"),
    (_set("preprocessing", [0.5, 0.25]),
     "preprocessing is [0.5, 0.25]; expected null or an object {mean, std}"),
    (_set("preprocessing", "std", _POP),
     "preprocessing.std is missing; expected a list of finite numbers > 0, of length 1"),
    (_set("preprocessing", "std", [0.0]),
     "preprocessing.std is [0.0]; expected a list of finite numbers > 0, of length 1"),
    (_set("preprocessing", "mean", [0.5, 0.5]),
     "preprocessing.mean is [0.5, 0.5]; expected a list of finite numbers, of length 1"),
    (_set("cost", "free"), "cost is 'free'; expected null or the cost table {backbone_macs, exits}"),
    (_set("cost", "backbone_macs", 0), "cost.backbone_macs is 0; expected a finite number > 0"),
    (_set("cost", "backbone_macs", 10 ** 400),  # a JSON integer that no float holds
     f"cost.backbone_macs is {str(10 ** 400)[:77]}...; expected a finite number > 0"),
    (_set("policy", "thresholds", [0.5, 10 ** 400]),
     f'policy.thresholds[1] is {str(10 ** 400)[:77]}...; expected a number, or "inf" / "-inf" as '
     'a string'),
    (_set("cost", "exits", []), "cost.exits is []; expected a list of 3 exit objects, one per piece"),
    (_set("cost", "exits", 0, "head_macs", _POP),
     "cost.exits[0].head_macs is missing; expected a finite number >= 0"),
    (_set("cost", "exits", 2, "macs", "1000"),
     "cost.exits[2].macs is '1000'; expected a finite number >= 0"),
    (_set("cost", "exits", 1, None), "cost.exits[1] is None; expected an object {macs, head_macs}"),
])
def test_runner_refuses_a_malformed_field_before_opening_any_model(exported, tmp_path, monkeypatch,
                                                                   edit, message):
    path = edited_copy(exported, tmp_path, edit)
    opened = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda f, *a, **k: opened.append(f) or real(f, *a, **k))
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err) == f"{path}: {message}"
    assert opened == []


def test_runner_reads_the_optional_fields_when_absent_or_null(exported, tmp_path):
    """No num_classes, no cost (NaN costs), no preprocessing, no input_range, no fused entries:
    the walk is the same."""
    ref = runner(exported)(X.numpy())

    def strip(m):
        for key in ("num_classes", "cost", "input_range", "preprocessing"):
            m.pop(key)
    got = runner(edited_copy(exported, tmp_path, strip))(X.numpy())
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert np.isnan(got[2]).all() and not np.isnan(ref[2]).any()


def test_runner_reads_an_export_with_fused_pieces(tmp_path):
    """export_segments(fused=True) adds fused, fused_inputs and fused_outputs to every piece: the
    runner accepts them, and open_session opens the fused files by name."""
    policy = create_policy("confidence", 0.5)
    path = export_segments(NET, INPUT, tmp_path / "onnx", policy, COST, check=False, fused=True)
    m = json.loads(path.read_text())
    assert all({"fused", "fused_inputs", "fused_outputs"} <= set(p) for p in m["pieces"])
    r = runner(path)
    ref = DynamicEngine(NET, policy)(X)
    pred, exit_index, _ = r(X.numpy())
    np.testing.assert_array_equal(pred, ref.pred.numpy())
    np.testing.assert_array_equal(exit_index, ref.exit.numpy())
    for piece in m["pieces"]:
        session = r.open_session(piece["fused"])
        assert [i.name for i in session.get_inputs()] == piece["fused_inputs"]
        assert [o.name for o in session.get_outputs()] == piece["fused_outputs"]


def test_preprocess_without_recorded_preprocessing_is_refused(exported, tmp_path):
    r = runner(edited_copy(exported, tmp_path, lambda m: m.update(preprocessing=None)))
    with pytest.raises(RunnerError) as err:
        r.preprocess(np.zeros((2, *INPUT), np.float32))
    assert one_line(err) == ("the manifest has no preprocessing (mean/std): pass normalised values "
                             "to the runner itself")
    r(np.zeros((2, *INPUT), np.float32))  # normalised values still run


# --- a T-RecX-mitigated network: the final exit also reads the early exit's (tied) filters ----

def mitigated_net(mode):
    from eenet.models.trecx import TRecXExit

    torch.manual_seed(0)
    b = create_backbone("resnet8_tiny", num_classes=6, in_chans=3)
    net = build_early_exit_network(b, functools.partial(TRecXExit, width=64), "explicit",
                                   stages=[0], input_size=(3, 16, 16), mitigation=mode)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        net.final_head.fc.weight.normal_()  # a trained-looking mitigation, not its zero start
    return net.eval()


def test_export_of_a_trecx_mitigated_network_runs_as_the_engine(tmp_path):
    net = mitigated_net("trecx")
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # a threshold in the widest gap between scores near the median
        s = create_policy("max_prob").scores(net(x))[:, 0].sort().values
    j = 27 + int((s[28:37] - s[27:36]).argmax())
    cost = exit_cost_table(net, (3, 16, 16))
    for threshold, used in ((float((s[j] + s[j + 1]) / 2), {0, 1}), (math.inf, {1})):
        policy = create_policy("max_prob", [threshold])
        out = tmp_path / str(threshold)
        manifest = export_segments(net, (3, 16, 16), out, policy, cost)  # checks every piece
        pred, exit_idx, c = OnnxEarlyExitRunner(manifest, threads=1)(x.numpy())
        ref = DynamicEngine(net, policy, cost)(x)
        assert set(exit_idx.tolist()) == used
        np.testing.assert_array_equal(exit_idx, ref.exit.numpy())
        np.testing.assert_array_equal(pred, ref.pred.numpy())
        np.testing.assert_array_equal(c.astype(np.float32), ref.cost.numpy())  # as in the test above
    # the mitigation made it into final.onnx: without it the final exit predicts otherwise
    plain = copy.deepcopy(net)
    plain.final_head = None
    with torch.no_grad():
        unmitigated = plain(x).logits[-1].argmax(1).numpy()
    assert (unmitigated != pred).sum() >= 5, "the mitigation must change some final predictions"


# the concat mitigation (a second live value) is exported since manifest format 3: its runner is
# checked against the engine in tests/test_graph_export.py
