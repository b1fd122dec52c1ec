"""Exits on any traced model (eenet.models.graph_split, eenet.attach_exits), issue 17.

For torchvision and timm models and a U-Net-like model with a long skip across two
cuts, on random weights and small inputs: the static path's final exit is the unsplit
model's output exactly; the dynamic engine equals the static path followed by the
policy (random thresholds and batch sizes); fvcore's per-segment MACs add up to its
count of the unsplit model. Then the limits, each one line.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from eenet.build import attach_exits
from eenet.cost import exit_cost_table, macs_by_module, walk_macs
from eenet.errors import EENetError
from eenet.inference import DynamicEngine
from eenet.inference.latency import run_to_exit
from eenet.models import ExitBlock
from eenet.models.graph_split import GraphSplitNetwork, TokenExit
from eenet.policies import create_policy

SIZE = (3, 32, 32)


class UNet(nn.Module):
    """Encoder-decoder whose first encoder output is added back after the decoder: a skip
    that crosses the cuts at ``enc2`` and ``mid``."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, 2), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        a = self.enc1(x)
        d = self.dec(self.mid(self.enc2(a))) + a
        return self.fc(d.mean((2, 3)))


def small_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4,
                                                num_heads=2, hidden_dim=32, mlp_dim=64,
                                                num_classes=10)


def timm_model(name):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


#: model factory, exit nodes
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), ["layer1", "layer2.1", "layer3"]),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
                           ["features.2", "features.6"]),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10),
                        ["features.2", "features.4"]),
    "vit": (small_vit, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"]),
    "timm_resnet10t": (lambda: timm_model("resnet10t"), ["layer1", "layer3"]),
    "timm_convnext_atto": (lambda: timm_model("convnext_atto"), ["stages.0", "stages.2"]),
    "unet": (UNet, ["enc2", "mid"]),
}

#: models whose per-model checks take over 10 s on a 2-core CPU: run by make test-slow (the
#: others cover the same code paths in make test)
SLOW_MODELS = {"efficientnet_b0"}
MODEL_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n
                for n in sorted(MODELS)]

_BUILT: dict[str, tuple[nn.Module, GraphSplitNetwork]] = {}


def built(name):
    """The model (random weights and BatchNorm statistics, eval mode) and its split network."""
    if name not in _BUILT:
        torch.manual_seed(0)
        factory, at = MODELS[name]
        model = factory()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
        net = attach_exits(model, at=at, exit="pool", num_classes=None, input_size=SIZE).eval()
        _BUILT[name] = (model, net)
    return _BUILT[name]


def inputs(batch, seed=0):
    return torch.randn(batch, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_final_exit_is_the_unsplit_model_exactly(name):
    model, net = built(name)
    x = inputs(5)
    with torch.no_grad():
        out = net(x)
        want = model(x)
    assert len(out.logits) == net.num_exits == len(MODELS[name][1]) + 1
    assert torch.equal(out.logits[-1], want)
    assert torch.isinf(out.conf_logits[-1]).all()
    for lg, z in zip(out.logits[:-1], out.conf_logits[:-1]):
        assert lg.shape == want.shape and z.shape == (5,) and torch.isfinite(lg).all()


def test_the_unet_skip_is_carried_across_both_cuts():
    _, net = built("unet")
    live = net.live_values()
    assert live[0] == ["enc1.2", "enc2.1"] and live[1] == ["enc1.2", "mid.1"]


def test_exit_heads_follow_the_traced_shape():
    _, vit = built("vit")
    _, resnet = built("resnet18")
    assert all(isinstance(e, TokenExit) for e in vit.exits) and vit.shapes[0] == (17, 32)
    assert all(isinstance(e, ExitBlock) for e in resnet.exits)
    assert resnet.shapes == [(64, 8, 8), (128, 4, 4), (256, 2, 2)]


def rounding_spread(net, x):
    """How far float32 rounding moves logits and scores when the batch changes: max
    difference between the static path on the whole batch and on each sample alone
    (the dynamic engine runs later segments on sub-batches)."""
    with torch.no_grad():
        whole = net(x)
        alone = [net(x[i:i + 1]) for i in range(x.shape[0])]
    logits = max(float((whole.logits[j][i] - a.logits[j][0]).abs().max())
                 for i, a in enumerate(alone) for j in range(net.num_exits))
    pol = create_policy("max_prob")
    s_whole = pol.scores(whole)
    scores = max(float((s_whole[i] - pol.scores(a)[0]).abs().max()) for i, a in enumerate(alone))
    return logits, scores


def thresholds_in_gaps(scores, quantiles, margin):
    """A threshold per exit between two neighbouring static scores whose gap is wider than
    ``2 * margin``, near the given quantile (inf when no gap is wide enough), so that
    rounding of that size cannot move a sample across it."""
    out = []
    for j, q in enumerate(quantiles):
        s = sorted(scores[:, j].tolist())
        k = int(q * (len(s) - 1))
        gaps = [i for i in range(len(s) - 1) if s[i + 1] - s[i] > 2 * margin]
        if not gaps:
            out.append(math.inf)
            continue
        i = min(gaps, key=lambda g: abs(g - k))
        out.append((s[i] + s[i + 1]) / 2)
    return out


@pytest.mark.parametrize("name", MODEL_PARAMS)
@given(batch=st.integers(1, 12), seed=st.integers(0, 1000), data=st.data())
@settings(max_examples=4, deadline=None)
def test_engine_equals_static_path_then_policy(name, batch, seed, data):
    _, net = built(name)
    x = inputs(batch, seed)
    with torch.no_grad():
        static = net(x)
    pol = create_policy("max_prob")
    spread_logits, spread_scores = rounding_spread(net, x)
    # margin: 4x the measured batch-to-sample rounding of the scores (the static and the
    # dynamic values each differ from the exact one by about that much; 2x for safety)
    quantiles = [data.draw(st.floats(0, 1)) for _ in range(net.num_exits - 1)]
    t = thresholds_in_gaps(pol.scores(static), quantiles, 4 * spread_scores + 1e-7)
    if data.draw(st.booleans()):  # an idle exit too: its head is skipped
        t[data.draw(st.integers(0, len(t) - 1))] = math.inf
    policy = create_policy("max_prob", t)
    exits = policy.decide(static)
    chosen = torch.stack(static.logits, 1)[torch.arange(batch), exits]
    costs = exit_cost_table(net).fractions if batch == 1 else None
    out = DynamicEngine(net, policy, costs, keep_logits=True)(x)
    assert torch.equal(out.exit, exits)
    assert torch.equal(out.pred, chosen.argmax(1))
    torch.testing.assert_close(out.logits, chosen, rtol=0, atol=4 * spread_logits + 1e-7)


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_segment_macs_add_up_to_the_unsplit_model(name):
    model, net = built(name)
    bodies, heads = walk_macs(net, net.walk(), SIZE)
    assert len(bodies) == net.num_exits and all(b > 0 for b in bodies)
    assert sum(bodies) == macs_by_module(model, SIZE)[""]
    assert heads[-1] == 0 and all(h > 0 for h in heads[:-1])
    table = exit_cost_table(net)
    assert table.backbone_macs == sum(bodies)
    assert table.exits[-1].macs == sum(bodies) + sum(heads)
    assert [e.macs for e in table.exits] == sorted(e.macs for e in table.exits)


def test_latency_walk_reaches_every_exit():
    _, net = built("unet")
    x = inputs(3)
    with torch.no_grad():
        static = net(x)
        for i in range(net.num_exits):
            assert torch.equal(run_to_exit(net, x, i), static.logits[i])


def test_training_reaches_every_exit_parameter():
    """Static path in train mode: the loss of every exit gives every exit parameter a
    gradient, also where the model later changes the exit's input in place (ReLU)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    net = attach_exits(model, at=["layer1.0.relu", "layer2"], input_size=SIZE).train()
    out = net(inputs(4))
    sum(lg.logsumexp(1).sum() + z.sum() for lg, z in zip(out.logits[:-1], out.conf_logits[:-1])
        ).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.exits.parameters())


def test_placement_by_macs_and_by_index_among_block_outputs():
    from eenet.models.graph_split import block_outputs
    from eenet.models.placement import cost_targets

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    candidates = block_outputs(model, SIZE)
    assert candidates == ["layer1.0", "layer1", "layer2.0", "layer2", "layer3.0", "layer3",
                          "layer4.0", "layer4"]
    net = attach_exits(model, input_size=SIZE, placement="linear", num_exits=2)
    assert net.exit_nodes == [candidates[k] for k in net.exit_stages]
    # each exit is the first block output whose cumulative MACs (fvcore, every block
    # output a cut) reach the linear distribution's target
    probe = attach_exits(model, at=candidates, input_size=SIZE)
    bodies, _ = walk_macs(probe, probe.walk(), SIZE)
    cumulative = [sum(bodies[:k + 1]) for k in range(len(bodies))]
    for k, target in zip(net.exit_stages, cost_targets("linear", 2, sum(bodies))):
        assert cumulative[k] >= target and (k == 0 or cumulative[k - 1] < target)
    net = attach_exits(model, input_size=SIZE, placement="explicit", stages=[1, 5])
    assert net.exit_nodes == ["layer1", "layer3"]


@pytest.mark.parametrize("kwargs, message", [
    ({"at": ["layer9"]}, "node 'layer9' is not in the traced graph of ResNet; nearest names: layer4"),
    ({"at": ["layer3", "layer1"]}, "distinct and in execution order"),
    ({"at": ["flatten"]}, "node 'flatten' gives shape (batch, 512)"),
    ({"at": ["fc"]}, "is the model's output or after it"),
    ({"at": ["layer1"], "num_classes": 7}, "num_classes=7 but ResNet returns 10 logits"),
    ({"at": ["layer1"], "exit": "avg"}, "unknown exit 'avg'; accepted: pool, bnpool, plain"),
])
def test_bad_exit_nodes_are_one_line(kwargs, message):
    model, _ = built("resnet18")
    with pytest.raises(EENetError) as err:
        attach_exits(model, input_size=SIZE, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = -y
        return self.fc(y.mean((2, 3)))


class CarriesBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        n = x.shape[0]
        y = self.b(self.a(x))
        return self.fc(y.reshape(n, 4, -1).mean(2))


def test_untraceable_models_and_non_tensor_live_values_are_one_line():
    with pytest.raises(EENetError, match=r"torch.fx cannot trace DataDependent .*StagedBackbone"):
        attach_exits(DataDependent(), at=["conv"], input_size=SIZE)
    with pytest.raises(EENetError, match=r"cut at 'a': value '.*' is read after the cut but is "
                                         r"a int, not a tensor"):
        attach_exits(CarriesBatchSize(), at=["a"], input_size=SIZE)


def test_configs_build_graph_networks_and_a_run_folder_cannot_name_user_code():
    from eenet.config import ALLOWED_TARGETS, check_targets, compose_config
    from eenet.runs import build_network

    cfg = compose_config(["backbone=torchvision", "backbone.name=resnet18", "dataset=cifar10",
                          "backbone.exits_at=[layer1,layer3]"], output_dir="unused")
    net = build_network(cfg, SIZE)
    assert isinstance(net, GraphSplitNetwork) and net.exit_nodes == ["layer1", "layer3"]
    cfg = compose_config(["backbone=graph", "backbone.model._target_=torchvision.models.resnet18",
                          "+backbone.model.num_classes=10", "dataset=cifar10",
                          "placement.method=explicit", "placement.stages=[0]",
                          "exit=pteenet"], output_dir="unused")
    net = build_network(cfg, SIZE)
    assert net.exit_nodes == ["layer1.0"] and net.exit_stages == [0]
    assert len(net.exits[0].pre) > 2  # the pteenet branch's convolutions
    # from a run folder the config is data: the graph builder is allowed, the user's own class
    # nested in it is not
    with pytest.raises(EENetError, match=r"backbone.model._target_ 'torchvision.models.resnet18' "
                                         r"is not one"):
        check_targets(cfg.backbone, "config.yaml", path="backbone",
                      allowed=ALLOWED_TARGETS | {"eenet.models.graph_backbone.graph_backbone"})
    cfg = compose_config(["backbone=torchvision", "mitigation=concat", "dataset=cifar10"],
                         output_dir="unused")
    with pytest.raises(EENetError, match="mitigation 'concat' applies to staged backbones"):
        build_network(cfg, SIZE)


def test_pretrained_weights_that_cannot_be_fetched_fail_at_once(monkeypatch):
    import socket
    import urllib.error

    from eenet.models.graph_backbone import timm_backbone, torchvision_backbone

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(EENetError, match=r"pretrained weights ResNet18_Weights.IMAGENET1K_V1 for "
                                         r"torchvision resnet18 could not be fetched"):
        torchvision_backbone("resnet18", num_classes=1000, pretrained=True)
    pytest.importorskip("timm")

    def no_dns(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(EENetError, match=r"pretrained weights timm/resnet10t\S* for timm "
                                         r"resnet10t could not be fetched"):
        timm_backbone("resnet10t", num_classes=10, pretrained=True)


def test_exit_factories_and_token_pools():
    model, _ = built("resnet18")
    net = attach_exits(model, at=["layer2"], input_size=SIZE,
                       exit=functools.partial(ExitBlock, preblock="bnpool", convs=1))
    assert net.exits[0].preblock == "bnpool"
    vit, _ = built("vit")
    net = attach_exits(vit, at=["encoder.layers.encoder_layer_1"], input_size=SIZE, tokens="cls")
    assert net.exits[0].pool == "cls"
    with torch.no_grad():
        assert torch.equal(net(inputs(2)).logits[-1], vit(inputs(2)))


# ONNX export of cut graphs (several live values per segment): tests/test_graph_export.py
