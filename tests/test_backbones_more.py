"""VGG, DenseNet and MobileNet backbones (torchvision and CIFAR-style) and the graph fallback."""

from __future__ import annotations

import copy
import functools
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from eenet.build import build_early_exit_network
from eenet.cost import exit_cost_table
from eenet.errors import EENetError
from eenet.losses import EENetLoss
from eenet.models import ExitBlock, create_backbone, list_backbones
from eenet.models.feature_extraction import (GraphExitNetwork, attach_points,
                                             build_graph_exit_network)
from eenet.models.torchvision_common import adapt_first_conv
from eenet.models.torchvision_densenet import TorchvisionDenseNet
from eenet.models.torchvision_mobilenet import TorchvisionMobileNet
from eenet.models.torchvision_vgg import TorchvisionVGG, fold_pool_for_small_input

# registered name -> (stage count, constructor arguments that keep a 32x32 test cheap)
NEW = {
    "vgg11_bn": (7, dict(small_input=True)),
    "vgg16_bn": (12, dict(small_input=True)),
    "densenet121": (7, {}),
    "mobilenet_v2": (18, {}),
    "mobilenet_v3_small": (12, {}),
    "cifar_vgg11_bn": (7, {}),
    "cifar_vgg16_bn": (12, {}),
    "cifar_densenet40": (38, {}),
    "cifar_densenet_bc100": (50, {}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this file: these small models run many small ops, and on busy
    cores two threads wait on each other far longer than they compute."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WRAPPERS = {"vgg11_bn": TorchvisionVGG, "vgg16_bn": TorchvisionVGG,
            "densenet121": TorchvisionDenseNet, "mobilenet_v2": TorchvisionMobileNet,
            "mobilenet_v3_small": TorchvisionMobileNet}


def test_the_new_backbones_are_registered():
    assert set(NEW) <= set(list_backbones())


# ---- torchvision wrappers: the staged network is the torchvision network -----------------------

@pytest.mark.parametrize("arch", sorted(WRAPPERS))
def test_stem_stages_head_equal_the_torchvision_model_exactly(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=5).eval()
    staged = WRAPPERS[arch](model).eval()
    assert {id(p) for p in staged.parameters()} == {id(p) for p in model.parameters()}
    size = 32 if arch.startswith("vgg") else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        y = staged.stem(x)
        for stage in staged.stages:
            y = stage(y)
        got = staged.head(y)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if not arch.startswith("vgg"):  # (VGG's 120 M-parameter classifier is slow to build twice)
        # the registered constructor builds the same network from the same seed
        torch.manual_seed(0)
        registered = create_backbone(arch, num_classes=5).eval()
        with torch.no_grad():
            torch.testing.assert_close(registered(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(NEW))
def test_hydra_config_builds_the_backbone(name, tmp_path):
    from hydra.utils import instantiate

    from eenet.config import compose_config

    _, kw = NEW[name]
    overrides = ["dataset=cifar10", f"backbone={name}"]
    overrides += [f"backbone.{k}={str(v).lower()}" for k, v in kw.items()]
    cfg = compose_config(overrides, tmp_path)
    assert cfg.backbone.name == name
    assert ("weights" in cfg.backbone) == (name in WRAPPERS)
    b = instantiate(cfg.backbone)
    assert b.num_classes == 10 and b.default_input_size == (3, 32, 32)


def test_vgg_small_input_folds_the_pool_without_changing_the_function():
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 40, 40)  # any size whose last feature map is 1x1
    with torch.no_grad():
        expected = model(x)
        # the noise floor: the unfolded model's own float32 error against it in float64; the
        # folded model is another float32 computation of the same function: 4x (two errors
        # of about the floor, and a maximum of another draw); measured <= 1.1x (4 seeds)
        floor = float((expected.double() - copy.deepcopy(model).double()(x.double())).abs().max())
        fold_pool_for_small_input(model)
        assert model.classifier[0].in_features == 512
        torch.testing.assert_close(model(x), expected, rtol=0, atol=4 * floor)


def test_densenet_head_is_norm_relu_pool_and_the_classifier():
    b = create_backbone("densenet121", num_classes=4, input_size=(32, 32))
    pool = b.head.pool
    assert isinstance(pool[0], nn.BatchNorm2d) and pool[0].num_features == 1024
    assert isinstance(pool[1], nn.ReLU) and b.head.fc.in_features == 1024
    kinds = [type(s).__name__ for s in b.stages]
    assert kinds == ["_DenseBlock", "_Transition"] * 3 + ["_DenseBlock"]


def test_mobilenet_v3_head_is_torchvisions_classifier():
    b = create_backbone("mobilenet_v3_small", num_classes=4)
    kinds = [type(m) for m in b.head.fc]
    assert kinds == [nn.Linear, nn.Hardswish, nn.Dropout, nn.Linear]
    assert b.num_features == 576 and b.stage_info[-1].channels == 576


@pytest.mark.parametrize("name", sorted(NEW))
def test_stage_info_matches_real_shapes(name):
    count, kw = NEW[name]
    b = create_backbone(name, num_classes=3, in_chans=1, input_size=(32, 32), **kw)
    assert b.num_stages == count
    for size in (32, 64):
        shapes = b.stage_shapes((1, size, size))
        assert len(shapes) == len(b.stage_info)
        for k, (info, (c, h, w)) in enumerate(zip(b.stage_info, shapes)):
            assert info.name == f"stages.{k}"
            assert (info.channels, h, w) == (c, size // info.reduction, size // info.reduction)
            previous = b.stage_info[k - 1].reduction if k else None
            if previous is not None:
                assert info.reduction == previous * info.stride


@pytest.mark.parametrize("name", sorted(NEW))
def test_build_and_cost_table_work(name):
    count, kw = NEW[name]
    b = create_backbone(name, num_classes=6, in_chans=1, input_size=(32, 32), **kw)
    net = build_early_exit_network(b, functools.partial(ExitBlock, preblock="bnpool"), "explicit",
                                   stages=[0, count // 2])
    table = exit_cost_table(net)
    fractions = table.fractions
    assert len(fractions) == 3 and fractions == sorted(fractions) and fractions[-1] > 1
    assert 0 < fractions[0] < 1
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 32, 32))
    assert [tuple(lg.shape) for lg in out.logits] == [(2, 6)] * 3


def test_in_chans_with_pretrained_filters_keeps_the_response_to_grey_images():
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=5)
    old = copy.deepcopy(model.features[0])
    adapt_first_conv(model, "features.0", 1, pretrained=True)
    new = model.features[0]
    assert new.in_channels == 1 and new.bias is not None
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        grey = x.repeat(1, 3, 1, 1)
        # the summed filters are rounded to float32, and the sums taken in another order:
        # 4x the old convolution's own float32 error against it in float64 (measured <= 1.4x)
        floor = float((old(grey).double() - copy.deepcopy(old).double()(grey.double())).abs().max())
        torch.testing.assert_close(new(x), old(grey), rtol=0, atol=4 * floor)


def test_unknown_weights_name_lists_the_accepted_ones():
    with pytest.raises(EENetError, match=r"unknown torchvision weights 'IMAGENET22K' for vgg16_bn; "
                                         r"accepted: IMAGENET1K_V1, DEFAULT"):
        create_backbone("vgg16_bn", weights="IMAGENET22K")


def test_failed_download_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(EENetError, match="could not load torchvision weights 'DEFAULT' for "
                                         "mobilenet_v3_small") as err:
        create_backbone("mobilenet_v3_small", num_classes=10, weights="DEFAULT")
    assert "\n" not in str(err.value)


def test_pretrained_weights_are_kept_when_classes_and_channels_change(monkeypatch):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v3_small(weights=None)  # stands for ImageNet weights
    state = reference.state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url",
                        lambda *a, **k: copy.deepcopy(state))
    b = create_backbone("mobilenet_v3_small", num_classes=7, in_chans=1, weights="IMAGENET1K_V1")
    torch.testing.assert_close(b.stem[0].weight, state["features.0.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(b.stages[3].block[1][0].weight, state["features.4.block.1.0.weight"])
    torch.testing.assert_close(b.head.fc[0].weight, state["classifier.0.weight"])
    assert b.head.fc[3].out_features == 7 and b.num_classes == 7


def test_inputs_too_small_are_rejected_with_the_minimum():
    with pytest.raises(EENetError, match="at least 32x32"):
        create_backbone("vgg11_bn", input_size=(28, 28))
    with pytest.raises(EENetError, match="at least 32x32"):
        create_backbone("cifar_vgg16_bn", input_size=(28, 28))
    with pytest.raises(EENetError, match="at least 8x8 with small_input"):
        create_backbone("densenet121", small_input=True, input_size=(4, 4))
    create_backbone("densenet121", small_input=True, input_size=(8, 8))


# ---- CIFAR-style VGG and DenseNet ------------------------------------------------------------

def test_cifar_vgg16_has_13_convolutions_in_the_usual_plan():
    b = create_backbone("cifar_vgg16_bn", num_classes=10)
    convs = [m.out_channels for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert [s.reduction for s in b.stage_info][-1] == 32
    assert b(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # larger inputs are pooled globally


@pytest.mark.parametrize("name,millions", [("cifar_densenet40", 1.0),
                                           ("cifar_densenet_bc100", 0.8)])
def test_cifar_densenets_have_the_papers_parameter_counts(name, millions):
    b = create_backbone(name, num_classes=10)
    params = sum(p.numel() for p in b.parameters())
    assert round(params / 1e6, 1) == millions  # Huang et al., Table 2


def test_cifar_densenet_rejects_bad_depths():
    from eenet.models.cifar_vgg_densenet import CifarDenseNet, CifarVGG

    with pytest.raises(EENetError, match=r"4 \+ 6n"):
        CifarDenseNet(depth=41, bottleneck=True)
    with pytest.raises(EENetError, match="must be one of"):
        CifarVGG(depth=13)


# ---- the graph fallback (torchvision feature extraction) ----------------------------------

class TinyNet(nn.Module):
    """A small model with functional calls and an in-place ReLU after a node an exit reads."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Spy(nn.Module):
    """Wraps an exit and keeps the input it received."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.inner(x)


def test_graph_exits_on_a_torchvision_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    net = build_graph_exit_network(model, ["layer1", "layer2.0.add", "layer3"],
                                   functools.partial(ExitBlock, preblock="pool"), (3, 64, 64))
    assert {id(p) for p in model.parameters()} <= {id(p) for p in net.parameters()}
    assert [p.shape for p in net.points] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert net.output_node == "fc" and net.num_exits == 4 and net.num_classes == 5
    net.eval()
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.setdefault("layer1", o.clone()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        expected = model(x)
    torch.testing.assert_close(out.logits[-1], expected, rtol=0, atol=0)
    assert [tuple(lg.shape) for lg in out.logits] == [(2, 5)] * 4
    assert torch.isinf(out.conf_logits[-1]).all() and all(z.shape == (2,) for z in out.conf_logits)
    with torch.no_grad():
        torch.testing.assert_close(out.logits[0], net.exits[0](seen["layer1"])[0], rtol=0, atol=0)


def test_graph_exits_read_nodes_before_later_in_place_ops():
    torch.manual_seed(0)
    model = TinyNet().eval()
    spy = Spy(ExitBlock(8, 4))
    net = GraphExitNetwork(model, ["bn1"], (1, 12, 12), exits=[spy]).eval()
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        out = net(x)
        bn1 = model.bn1(model.conv1(x))
        expected = model(x)
    assert (bn1 < 0).any()  # the in-place ReLU that follows would have zeroed these
    torch.testing.assert_close(spy.seen, bn1, rtol=0, atol=0)
    torch.testing.assert_close(out.logits[-1], expected, rtol=0, atol=0)


def test_graph_network_equals_the_staged_network_on_a_staged_backbone():
    torch.manual_seed(0)
    b = create_backbone("resnet20", num_classes=7, in_chans=1)
    staged = build_early_exit_network(b, functools.partial(ExitBlock, preblock="bnpool"),
                                      "explicit", stages=[2, 5], input_size=(1, 16, 16))
    graph = GraphExitNetwork(b, ["stages.2", "stages.5"], (1, 16, 16), exits=list(staged.exits))
    x = torch.randn(4, 1, 16, 16)
    for train in (False, True):
        staged.train(train)
        graph.train(train)
        with torch.no_grad():
            a, g = staged(x), graph(x)
        for p, q in zip(a.logits + a.conf_logits, g.logits + g.conf_logits):
            torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_every_parameter_of_a_graph_network_gets_a_gradient():
    torch.manual_seed(0)
    model = TinyNet()
    net = build_graph_exit_network(model, ["conv1", "bn2"],
                                   functools.partial(ExitBlock, preblock="plain"), (1, 12, 12))
    assert net.fixed_size and [p.shape for p in net.points] == [(8, 12, 12), (16, 6, 6)]
    net.train()
    out = net(torch.randn(4, 1, 12, 12))
    EENetLoss(version=2, lambda_coef=1.0)(out, torch.randint(0, 4, (4,)),
                                          torch.tensor([0.3, 0.7, 1.1]))["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    with pytest.raises(EENetError, match=r"expected \(batch, 1, 12, 12\)"):
        net(torch.randn(1, 1, 16, 16))


def test_graph_network_refuses_dynamic_inference():
    from eenet.inference.engine import DynamicEngine
    from eenet.policies import ConfidencePolicy

    net = build_graph_exit_network(TinyNet(), ["bn1"], ExitBlock, (1, 12, 12)).eval()
    with pytest.raises(EENetError, match="always computes every requested output"):
        net.segments()
    with pytest.raises(EENetError, match="StagedBackbone"):
        DynamicEngine(net, ConfidencePolicy(0.5))


def test_graph_node_errors_are_clear():
    model = TinyNet()
    with pytest.raises(EENetError, match="node 'bn3' is not in the graph.*close matches: bn2, bn1"):
        attach_points(model, ["bn3"], (1, 12, 12))
    with pytest.raises(EENetError, match="in execution order"):
        attach_points(model, ["bn2", "bn1"], (1, 12, 12))
    with pytest.raises(EENetError, match="not before the model's output"):
        attach_points(model, ["fc"], (1, 12, 12))
    with pytest.raises(EENetError, match=r"gives shape \(batch, 16\)"):
        build_graph_exit_network(model, ["flatten"], ExitBlock, (1, 12, 12))
    points = attach_points(model, ["conv1", "relu_1"], (1, 12, 12))
    assert [p.shape for p in points] == [(8, 12, 12), (16, 6, 6)]
    assert points[0].index < points[1].index


def test_graph_network_needs_one_logits_tensor():
    class TwoHeads(TinyNet):
        def forward(self, x):
            y = super().forward(x)
            return y, y

    with pytest.raises(EENetError, match=r"one \(batch, classes\) tensor"):
        build_graph_exit_network(TwoHeads(), ["bn1"], ExitBlock, (1, 12, 12))
