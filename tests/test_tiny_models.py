"""MLPerf Tiny keyword-spotting DS-CNN and Visual Wake Words MobileNetV1 as staged backbones."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eenet.build import build_early_exit_network
from eenet.cost import backbone_cost, exit_cost_table, macs_by_module
from eenet.models import ExitBlock, create_backbone, list_backbones
from eenet.models.mlperf_tiny import SamePad2d

TINY = ("dscnn_kws", "mobilenet_v1_vww")


def keras_parameter_count(model: nn.Module) -> int:
    """Parameters as Keras' ``model.summary()`` counts them (BatchNorm moving statistics too)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def conv_and_dense_macs(model: nn.Module, input_size) -> int:
    """Closed form: MACs of every Conv2d and Linear layer for one input (hooks, no fvcore)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return total


def test_registered():
    assert set(TINY) <= set(list_backbones())


@pytest.mark.parametrize("name,input_size,classes", [("dscnn_kws", (1, 49, 10), 12),
                                                      ("mobilenet_v1_vww", (3, 96, 96), 2)])
def test_default_input_and_output_shapes(name, input_size, classes):
    b = create_backbone(name).eval()
    assert b.default_input_size == input_size
    assert b.num_classes == classes and b.in_chans == input_size[0]
    x = torch.randn(3, *input_size)
    y = b(x)
    assert y.shape == (3, classes)
    torch.testing.assert_close(b.forward_head(b.forward_features(x)), y)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("in_chans,size", [(1, (49, 10)), (3, (32, 32)), (1, (33, 17))])
def test_stage_info_matches_real_shapes(name, in_chans, size):
    b = create_backbone(name, num_classes=5, in_chans=in_chans, input_size=size).eval()
    shapes = b.stage_shapes((in_chans, *size))
    assert len(shapes) == len(b.stage_info) == b.num_stages
    for info, (c, h, w) in zip(b.stage_info, shapes):
        assert info.channels == c
        # ``same`` padding: every stride-s layer maps n to ceil(n / s)
        assert (h, w) == (-(-size[0] // info.reduction), -(-size[1] // info.reduction))
    assert b(torch.randn(2, in_chans, *size)).shape == (2, 5)


def test_dscnn_matches_the_mlperf_tiny_reference():
    b = create_backbone("dscnn_kws")
    # Keras reference (keras_model.py, ds_cnn): 24,908 parameters of which 23,756 trainable
    # (the count NXP's eIQ model zoo lists); Hello Edge's "38.6K" for DS-CNN small is memory in KB
    assert keras_parameter_count(b) == 24_908
    assert sum(p.numel() for p in b.parameters()) == 23_756
    assert b.num_stages == 4
    assert [s.channels for s in b.stage_info] == [64] * 4
    assert [s.reduction for s in b.stage_info] == [2] * 4
    assert b.stage_shapes() == [(64, 25, 5)] * 4
    convs = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (10, 4) and convs[0].stride == (2, 2)
    assert all(m.bias is not None for m in convs)
    assert sum(m.groups == 64 and m.kernel_size == (3, 3) for m in convs) == 4
    assert [m.p for m in b.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.4]


def test_mobilenet_v1_025_matches_the_mlperf_tiny_reference():
    b = create_backbone("mobilenet_v1_vww")
    # Keras reference (vww_model.py): 221,794 parameters, 216,322 trainable
    assert keras_parameter_count(b) == 221_794
    assert sum(p.numel() for p in b.parameters()) == 216_322
    assert b.num_stages == 13
    assert [s.channels for s in b.stage_info] == [16, 32, 32, 64, 64] + [128] * 6 + [256, 256]
    assert [s.stride for s in b.stage_info] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert [s.reduction for s in b.stage_info] == [2, 4, 4, 8, 8] + [16] * 6 + [32, 32]
    assert b.stage_shapes()[-1] == (256, 3, 3)
    assert b.num_features == 256


@pytest.mark.parametrize("name,conv_dense,fvcore_total", [
    ("dscnn_kws", 2_656_768, 2_808_768),         # Hello Edge: 5.4 M ops = 2.7 M MACs
    ("mobilenet_v1_vww", 7_489_664, 7_955_072),  # model card: "15 MOPS" = 7.5 M MACs
])
def test_macs_pinned_and_closed_form(name, conv_dense, fvcore_total):
    b = create_backbone(name)
    assert conv_and_dense_macs(b, b.default_input_size) == conv_dense
    cost = backbone_cost(b, b.default_input_size)
    assert cost.total == fvcore_total
    by_module = macs_by_module(b, b.default_input_size)
    assert by_module[""] == cost.total and len(cost.stages) == b.num_stages
    assert all(m > 0 for m in cost.stages)


def test_dscnn_closed_form_per_stage():
    b = create_backbone("dscnn_kws")
    cost = backbone_cost(b, (1, 49, 10))
    hw = 25 * 5
    bn = 2 * 64 * hw  # fvcore: BatchNorm costs 2 per element
    assert cost.stem == hw * 64 * 10 * 4 + bn
    assert cost.stages == [hw * 64 * 9 + hw * 64 * 64 + 2 * bn] * 4
    assert cost.head == 64 * hw + 64 * 12  # average pooling + dense


def test_same_padding_is_tensorflows():
    # TensorFlow "same": total = max((ceil(n/s) - 1) * s + k - n, 0), the odd pixel at the end
    assert SamePad2d.amounts(49, 10, 2) == (4, 5)
    assert SamePad2d.amounts(10, 4, 2) == (1, 1)
    assert SamePad2d.amounts(96, 3, 2) == (0, 1)
    assert SamePad2d.amounts(95, 3, 2) == (1, 1)
    assert SamePad2d.amounts(5, 1, 1) == (0, 0)
    b = create_backbone("dscnn_kws").eval()
    conv = [m for m in b.stem.modules() if isinstance(m, nn.Conv2d)][0]
    x = torch.randn(2, 1, 49, 10)
    expected = F.conv2d(F.pad(x, (1, 1, 4, 5)), conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(b.stem[0](x), expected)
    m = create_backbone("mobilenet_v1_vww").eval()
    conv = [c for c in m.stem.modules() if isinstance(c, nn.Conv2d)][0]
    x = torch.randn(1, 3, 96, 96)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(m.stem[0](x), expected)


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    b = create_backbone(name, input_size=(33, 17) if name == "mobilenet_v1_vww" else None)
    x = torch.randn(4, b.in_chans, *b.default_input_size[1:])
    b(x).logsumexp(1).sum().backward()
    missing = [n for n, p in b.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_dscnn_early_exit_network_and_cost_table():
    b = create_backbone("dscnn_kws")
    net = build_early_exit_network(b, functools.partial(ExitBlock, preblock="pool"),
                                   placement="explicit", stages=[0, 2])
    assert net.exit_stage_indices() == [0, 2, 3]
    out = net.eval()(torch.randn(5, 1, 49, 10))
    assert [tuple(z.shape) for z in out.logits] == [(5, 12)] * 3
    table = exit_cost_table(net)
    fractions = table.fractions
    assert fractions == sorted(fractions) and fractions[-1] > 1.0
    base = backbone_cost(b, (1, 49, 10))
    head = 64 * 125 + 64 * 12 + 64  # pool + classifier + confidence
    assert table.exits[0].macs == base.stem + base.stages[0] + head
    assert table.exits[-1].macs == macs_by_module(net, (1, 49, 10))[""]


def test_mobilenet_early_exit_network_with_cost_placement():
    b = create_backbone("mobilenet_v1_vww")
    net = build_early_exit_network(b, functools.partial(ExitBlock, preblock="bnpool"),
                                   placement="linear", num_exits=2)
    assert len(net.exit_stages) == 2 and net.exit_stages[-1] < b.num_stages - 1
    out = net.eval()(torch.randn(2, 3, 96, 96))
    assert [tuple(z.shape) for z in out.logits] == [(2, 2)] * 3
    table = exit_cost_table(net)
    assert table.backbone_macs == 7_955_072
    assert table.fractions == sorted(table.fractions)


@pytest.mark.parametrize("name", TINY)
def test_backbone_configs_compose(name, tmp_path):
    from hydra.utils import instantiate

    from eenet.config import compose_config

    dataset = "kws12_subset" if name == "dscnn_kws" else "vww"
    cfg = compose_config([f"backbone={name}", f"dataset={dataset}"], tmp_path)
    b = instantiate(cfg.backbone)
    assert type(b).__name__ in ("DSCNN", "MobileNetV1")
    assert b.default_input_size == (cfg.dataset.in_chans, *cfg.dataset.image_size)
    assert b.num_classes == cfg.dataset.num_classes
