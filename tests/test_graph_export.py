"""ONNX export of networks whose segments carry several live values, and which graph builders a
run folder may name (issue 17).

Export: a torchvision resnet18 cut inside a residual block (its shortcut crosses the cut),
the U-Net-like model of tests/test_graph_exits.py (a skip across two cuts) and staged
T-RecX-mitigated networks (``concat``: the early exit's features are a second live value
up to the final exit; ``trecx``: one value), random weights, small inputs. Every piece
names the live values it reads and computes; the runner (numpy + onnxruntime) gives the
engine's predictions, exits and costs, keeps only the remaining samples of every live
value, and still reads a format-2 manifest.

Allow-list: a run folder's config may name the torchvision / timm / graph builders, never
the user's own class nested in ``backbone.model._target_``, which the user's own command
line may name.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from eenet.build import attach_exits, build_early_exit_network
from eenet.config import ALLOWED_TARGETS, check_targets, compose_config
from eenet.cost import exit_cost_table
from eenet.errors import EENetError
from eenet.export import export_segments
from eenet.export.onnx_runner import OnnxEarlyExitRunner, RunnerError
from eenet.inference import DynamicEngine
from eenet.models import create_backbone
from eenet.models.graph_split import GraphSplitNetwork
from eenet.models.trecx import TRecXExit
from eenet.policies import create_policy
from eenet.runs import build_network, check_run_folder
from test_graph_exits import UNet  # the user's own model with a long skip (tests/ is on sys.path)

SIZE = (3, 32, 32)
BATCH = 48


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---- the allow-list: a run folder's config is data ----------------------------------------------

def graph_config(*overrides):
    return compose_config(["backbone=graph", "backbone.model._target_=test_graph_exits.UNet",
                           "+backbone.model.classes=10", "backbone.exits_at=[enc2,mid]",
                           "dataset=cifar10", *overrides],
                          output_dir="unused")


def run_folder(cfg, folder: Path) -> Path:
    """A finished-looking run folder holding ``cfg`` (resolved, as eenet-train writes it)."""
    folder.mkdir()
    OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), folder / "config.yaml")
    torch.save({}, folder / "model.pt")
    return folder


def test_the_users_class_runs_from_the_command_line_never_from_a_run_folder(tmp_path):
    cfg = graph_config()
    # the user's own command line (trusted, as eenet-train builds it): the class is built
    net = build_network(cfg, SIZE)
    assert isinstance(net, GraphSplitNetwork) and isinstance(net.backbone, UNet)
    assert net.exit_nodes == ["enc2", "mid"]
    # the same config read as data: the builder passes, the class nested in it does not
    assert "eenet.models.graph_backbone.graph_backbone" in ALLOWED_TARGETS
    with pytest.raises(EENetError) as err:
        build_network(cfg, SIZE, trusted=False)
    assert one_line(err).startswith("backbone: model._target_ 'test_graph_exits.UNet' is not one "
                                    "of the classes eenet allows there")
    folder = run_folder(cfg, tmp_path / "run")
    with pytest.raises(EENetError) as err:
        check_run_folder(folder)
    assert one_line(err) == (f"{folder / 'config.yaml'}: backbone.model._target_ "
                             "'test_graph_exits.UNet' is not one of the classes eenet allows "
                             "there; a run folder's config is data and cannot name code to run")
    # not even one of eenet's own builders may stand in the model's place (eenet.runs builds
    # nothing nested in a run's backbone; refused at the root for now, since its RUN_BUILDS
    # does not list the graph builders yet)
    cfg.backbone.model = {"_target_": "eenet.models.graph_backbone.torchvision_backbone",
                          "name": "resnet18", "num_classes": 10}
    with pytest.raises(EENetError, match=r"backbone(\.model)?\._target_ '\S+' is not one of the "):
        check_run_folder(run_folder(cfg, tmp_path / "nested"))


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_every_target_of_a_torchvision_or_timm_run_is_allowed(source):
    cfg = compose_config([f"backbone={source}", "backbone.name=resnet18", "dataset=cifar10"],
                         output_dir="unused")
    check_targets(cfg, "config.yaml")  # the whole config: data module, optimizer, trainer, ...
    assert cfg.backbone._target_ == f"eenet.models.graph_backbone.{source}_backbone"
    with pytest.raises(EENetError, match="backbone.kwargs._target_ 'os.system' is not one"):
        check_targets(compose_config([f"backbone={source}", "dataset=cifar10",
                                      "+backbone.kwargs._target_=os.system"],
                                     output_dir="unused"), "config.yaml")


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_a_torchvision_or_timm_run_folder_is_accepted(source, tmp_path):
    cfg = compose_config([f"backbone={source}", "backbone.name=resnet18", "dataset=cifar10"],
                         output_dir="unused")
    assert check_run_folder(run_folder(cfg, tmp_path / "run")).backbone.name == "resnet18"


# ---- ONNX export of several live values -----------------------------------------------------

def randomised(net: nn.Module) -> nn.Module:
    """Random BatchNorm statistics (so that eval mode matters) and, for a T-RecX final head,
    non-zero weights (it starts at zero: without this the carried value would change nothing)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        head = getattr(net, "final_head", None)
        if head is not None:
            head.fc.weight.normal_()
    return net.eval()


def staged(mitigation):
    b = create_backbone("resnet8_tiny", num_classes=6, in_chans=3)
    return build_early_exit_network(b, functools.partial(TRecXExit, width=64), "explicit",
                                    stages=[0, 1], input_size=(3, 16, 16), mitigation=mitigation)


def build(name):
    torch.manual_seed(0)
    if name == "resnet18":  # the first cut is inside block layer1.0: its shortcut is carried
        model = randomised(torchvision.models.resnet18(num_classes=10))
        return randomised(attach_exits(model, at=["layer1.0.relu", "layer2.1", "layer3"],
                                       input_size=SIZE)), SIZE
    if name == "unet":
        return randomised(attach_exits(randomised(UNet()), at=["enc2", "mid"], input_size=SIZE)), SIZE
    return randomised(staged(name.removeprefix("trecx_"))), (3, 16, 16)


NAMES = ["resnet18", "unet", "trecx_concat", "trecx_trecx"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Each network exported once (every piece checked against PyTorch by the exporter)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name in NAMES:
        net, size = build(name)
        cost = exit_cost_table(net, size)
        folder = tmp_path_factory.mktemp(name)
        export_segments(net, size, folder, create_policy("max_prob", [0.5] * (net.num_exits - 1)),
                        cost)
        x = torch.randn(BATCH, *size, generator=torch.Generator().manual_seed(1)) * 2
        out[name] = (net, size, cost, folder, x)
    yield out
    torch.set_num_threads(before)


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def with_thresholds(folder, thresholds, name="manifest_t.json", edit=None):
    m = manifest(folder)
    m["policy"]["thresholds"] = [t if math.isfinite(t) else str(t) for t in thresholds]
    if edit:
        edit(m)
    (folder / name).write_text(json.dumps(m))
    return folder / name


def onnx_static_scores(folder, x):
    """Every piece and every head on the whole batch, values passed by the manifest's names
    (a reading of the format independent of the runner); max_prob scores (B, N)."""
    m = manifest(folder)
    values, scores = {m["input"]: x}, []
    for p in m["pieces"]:
        for file, ins, outs in ((p["segment"], p["segment_inputs"], p["segment_outputs"]),
                                (p["head"], p["head_inputs"], p["outputs"] + p["head_live_outputs"])):
            sess = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
            got = sess.run(outs, {n: values[n] for n in ins})
            values.update(zip(outs, got))
        logits = torch.from_numpy(values["logits"])
        scores.append(logits.softmax(1).max(1).values)
    return torch.stack(scores[:-1], 1)


def margin_for(net, folder, x):
    """How far a score may move between the static PyTorch path, the engine and the runner,
    measured here: ONNX against PyTorch on the whole batch, plus PyTorch on the whole batch
    against each sample alone (the engine and the runner run later pieces on sub-batches).
    4x their sum: each side deviates by up to that much from the static score, and the
    sub-batches actually run are other draws of the same rounding (2x for safety)."""
    pol = create_policy("max_prob")
    with torch.no_grad():
        static = pol.scores(net(x))  # (B, N): the early exits
        alone = torch.cat([pol.scores(net(x[i:i + 1])) for i in range(len(x))])
    onnx = onnx_static_scores(folder, x.numpy())
    spread = float((onnx - static).abs().max()) + float((alone - static).abs().max())
    assert spread < 1e-4, "float32 noise, not a mismatch (which would make the margin meaningless)"
    return static, 4 * spread + 1e-7


def thresholds_in_gaps(static, quantiles, margin):
    """Per early exit, a threshold in the middle of the gap between neighbouring static scores
    (of the samples that reach it) nearest the quantile and wider than 2 * margin."""
    remaining = torch.ones(len(static), dtype=torch.bool)
    out = []
    for j, q in enumerate(quantiles):
        s = sorted(static[remaining, j].tolist())
        gaps = [i for i in range(len(s) - 1) if s[i + 1] - s[i] > 2 * margin]
        if not gaps:
            out.append(math.inf)
            continue
        i = min(gaps, key=lambda g: abs(g - q * (len(s) - 1)))
        out.append((s[i] + s[i + 1]) / 2)
        remaining &= ~(static[:, j] > out[-1])
    return out


class Recording:
    """An onnxruntime session that records the batch length of every value it is fed."""

    def __init__(self, session, name, calls):
        self.session, self.name, self.calls = session, name, calls

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feeds):
        self.calls.append((self.name, {n: len(v) for n, v in feeds.items()}))
        return self.session.run(outputs, feeds)


@pytest.mark.parametrize("name", NAMES)
def test_runner_reproduces_the_engine(cases, name):
    net, size, cost, folder, x = cases[name]
    static, margin = margin_for(net, folder, x)
    n = net.num_exits - 1
    mixed = thresholds_in_gaps(static, [0.5] * n, margin)
    settings = [mixed, [math.inf, *mixed[1:]], [-math.inf] * n, [math.inf] * n]
    for thresholds in settings:
        policy = create_policy("max_prob", thresholds)
        onnx = OnnxEarlyExitRunner(with_thresholds(folder, thresholds), threads=1)
        ref = DynamicEngine(net, policy, cost)(x)
        pred, exit_idx, c = onnx(x.numpy())
        np.testing.assert_array_equal(exit_idx, ref.exit.numpy(), err_msg=str(thresholds))
        np.testing.assert_array_equal(pred, ref.pred.numpy(), err_msg=str(thresholds))
        # the same integers (MACs minus skipped heads) over backbone MACs, one float64
        # division on both sides; the engine keeps it in float32
        np.testing.assert_array_equal(c.astype(np.float32), ref.cost.numpy())
        with torch.no_grad():  # and both are the static path followed by the policy
            assert torch.equal(ref.exit, policy.decide(net(x)))
    with torch.no_grad():
        first = create_policy("max_prob", mixed).decide(net(x))
    assert len(set(first.tolist())) >= 2, "the mixed thresholds must send samples to several exits"
    onnx = OnnxEarlyExitRunner(with_thresholds(folder, mixed), threads=1)
    engine = DynamicEngine(net, create_policy("max_prob", mixed), cost)
    for i in range(8):  # batch size 1
        one = engine(x[i:i + 1])
        p1, e1, _ = onnx(x[i:i + 1].numpy())
        assert (int(p1[0]), int(e1[0])) == (int(one.pred[0]), int(one.exit[0])), i


@pytest.mark.parametrize("name", NAMES)
def test_every_live_value_keeps_only_the_remaining_samples(cases, name):
    net, size, cost, folder, x = cases[name]
    static, margin = margin_for(net, folder, x)
    thresholds = thresholds_in_gaps(static, [0.5] * (net.num_exits - 1), margin)
    onnx = OnnxEarlyExitRunner(with_thresholds(folder, thresholds), threads=1)
    calls = []
    onnx.pieces = [(Recording(s, f"segment{j}", calls), Recording(h, f"head{j}", calls))
                   for j, (s, h) in enumerate(onnx.pieces)]
    _, exit_idx, _ = onnx(x.numpy())
    reach = [int((exit_idx >= j).sum()) for j in range(net.num_exits)]
    m = manifest(folder)
    expected = []
    for j, p in enumerate(m["pieces"]):
        if reach[j] == 0:
            break
        expected.append((f"segment{j}", {v: reach[j] for v in p["segment_inputs"]}))
        idle = j < len(thresholds) and thresholds[j] == math.inf and p["skippable"]
        if not idle:
            expected.append((f"head{j}", {v: reach[j] for v in p["head_inputs"]}))
    assert calls == expected


def test_the_manifests_name_the_live_values(cases):
    pieces = manifest(cases["unet"][3])["pieces"]
    # the skip (enc1.2) is computed by segment 0, carried past both cuts, read by segment 2
    assert [p["segment_inputs"] for p in pieces] == [["x"], ["enc2.1"], ["enc1.2", "mid.1"]]
    assert [p["live"] for p in pieces] == [["enc1.2", "enc2.1"], ["enc1.2", "mid.1"], []]
    pieces = manifest(cases["resnet18"][3])["pieces"]
    assert len(pieces[0]["live"]) == 2  # the block's shortcut and its first ReLU
    assert pieces[1]["segment_inputs"] == pieces[0]["live"]
    pieces = manifest(cases["trecx_concat"][3])["pieces"]
    # exit 0's features: added by its head (so never skipped), carried past exit 1, read last
    assert pieces[0]["head_live_outputs"] == ["exit_0.features"] and not pieces[0]["skippable"]
    assert "exit_0.features" in pieces[1]["live"]
    assert pieces[2]["head_inputs"] == ["features_2", "exit_0.features"]
    assert all(len(p["live"]) <= 1 for p in manifest(cases["trecx_trecx"][3])["pieces"])
    # an exit that releases nobody: its head is skipped unless a later piece reads it
    folder = cases["trecx_concat"][3]
    onnx = OnnxEarlyExitRunner(with_thresholds(folder, [math.inf, math.inf]), threads=1)
    assert onnx.idle == [False, True]


def test_a_format_2_manifest_is_still_read(cases):
    """A one-value export written as format 2 (no value names) runs as its format-3 manifest."""
    net, size, cost, folder, x = cases["trecx_trecx"]
    static, margin = margin_for(net, folder, x)
    thresholds = thresholds_in_gaps(static, [0.5, 0.5], margin)

    def as_format_2(m):
        m["format_version"] = 2
        for key in ("input",):
            m.pop(key)
        for p in m["pieces"]:
            for key in ("segment_inputs", "segment_outputs", "head_inputs", "head_live_outputs",
                        "live", "skippable"):
                p.pop(key)

    new = OnnxEarlyExitRunner(with_thresholds(folder, thresholds), threads=1)(x.numpy())
    old = OnnxEarlyExitRunner(with_thresholds(folder, thresholds, "v2.json", as_format_2),
                              threads=1)(x.numpy())
    for a, b in zip(new, old):
        np.testing.assert_array_equal(a, b)
    assert len(set(new[1].tolist())) >= 2


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["pieces"][1]["live"].remove("enc1.2"),
     "segment_2.onnx reads ['enc1.2'], which no earlier piece gives (available: ['mid.1']; "
     "the input is 'x')"),
    (lambda m: m["pieces"][2]["segment_inputs"].remove("enc1.2"),
     "segment_2.onnx takes ['enc1.2', 'mid.1'] and gives ['output'], the manifest says ['mid.1'] "
     "-> ['output']: it does not belong to this manifest"),
    (lambda m: m["pieces"][0].pop("live"),
     "piece 0 has no list of value names 'live' (manifest format 3)"),
    (lambda m: m["pieces"][0].update(skippable="yes"),
     "piece 0 has skippable='yes'; accepted: true or false, false when its head adds live values"),
])
def test_a_manifest_whose_values_do_not_fit_is_refused_in_one_line(cases, edit, message):
    folder = cases["unet"][3]
    path = with_thresholds(folder, [0.5, 0.5], "edited.json", edit)
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err) == f"{path}: {message}"
