"""T-RecX exits as the paper builds them (eenet/models/trecx.py, conf/experiment/trecx_*.yaml).

Ghanathe & Wilton, "T-RecX", ACM CF 2023. Sizes and MACs are checked against closed
forms of the paper's layers; the experiment configs' exit cost fractions against the
figures issue 20 reads from the paper's code (tolerance 0.05, the issue's acceptance).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from eenet.build import build_early_exit_network
from eenet.config import compose_config
from eenet.cost import exit_cost_table
from eenet.errors import EENetError
from eenet.inference import DynamicEngine
from eenet.models import create_backbone
from eenet.models.trecx import TRecXExit
from eenet.policies import create_policy
from eenet.runs import build_network
from test_engine import FLOOR_FACTOR, float32_floor  # the static path's measured float32 floor

#: experiment, input size, the issue's reading of the paper: cost fraction of reaching the exit
PAPER = [("trecx_resnet8", (3, 32, 32), 0.46), ("trecx_dscnn_kws", (1, 49, 10), 0.57),
         ("trecx_mobilenet_vww", (3, 96, 96), 0.42)]


def composed(experiment, mitigation=None, extra=()):
    return compose_config([f"experiment={experiment}", f"mitigation={mitigation or 'null'}",
                           *extra], output_dir="unused")


@pytest.mark.parametrize("mitigation", [None, "trecx"])
@pytest.mark.parametrize("experiment,size,paper", PAPER)
def test_experiment_exit_cost_is_the_papers(experiment, size, paper, mitigation):
    table = exit_cost_table(build_network(composed(experiment, mitigation), size))
    assert abs(table.fractions[0] - paper) <= 0.05, table.to_markdown()
    # the mitigation adds to the final exit only, never to the early one
    assert table.fractions[-1] > table.fractions[0]


@pytest.mark.parametrize("experiment,size,paper", PAPER)
def test_wide_variants_keep_the_earlier_heavier_exit(experiment, size, paper):
    """``*_wide`` is the former block: 1x1 conv to the final stage's width, 3x3 depthwise, global pool."""
    cfg = composed(f"{experiment}_wide")
    net = build_network(cfg, size)
    final_channels = net.backbone.stage_info[-1].channels
    ex = net.exits[0]
    assert ex.pointwise.out_channels == final_channels
    assert ex.depthwise.kernel_size == (3, 3) and ex.depthwise.padding == (1, 1)
    assert ex.num_features == final_channels
    old = build_early_exit_network(copy.deepcopy(net.backbone),
                                   functools.partial(TRecXExit, width=final_channels),
                                   "explicit", stages=list(net.exit_stages), input_size=size)
    assert exit_cost_table(old).fractions == exit_cost_table(net).fractions
    paper_net = build_network(composed(experiment), size)
    assert exit_cost_table(paper_net).fractions[0] < exit_cost_table(net).fractions[0]


def test_resnet8_exit_layers_and_macs_are_the_papers():
    net = build_network(composed("trecx_resnet8"), (3, 32, 32))
    ex = net.exits[0]
    assert net.exit_stages == [0]
    # 16x32x32 -> 1x1 conv to 32 -> 2x2 depthwise stride 2 -> 32x16x16 -> 4x4 pool -> 4x4 grid
    assert (ex.pointwise.in_channels, ex.pointwise.out_channels) == (16, 32)
    assert ex.depthwise.kernel_size == (2, 2) and ex.depthwise.stride == (2, 2)
    assert ex.depthwise.groups == 32
    assert ex.num_features == 32 * 4 * 4
    head = exit_cost_table(net).exits[0].head_macs
    # fvcore: conv and dense MACs (pooling and ReLU are free), the stats confidence head 3 -> 1
    assert head == 16 * 32 * 32 * 32 + 2 * 2 * 32 * 16 * 16 + 512 * 10 + 3


def test_dscnn_exit_reads_the_first_32_channels_without_a_pointwise_conv():
    net = build_network(composed("trecx_dscnn_kws"), (1, 49, 10))
    ex = net.exits[0]
    assert ex.pointwise is None
    assert ex.depthwise.in_channels == 32 and ex.depthwise.kernel_size == (3, 3)
    # 64x25x5 -> first 32 -> 3x3 depthwise stride 2, same -> 32x13x3 -> 2x2 pool -> 6x1 grid
    assert ex.num_features == 32 * 6 * 1
    head = exit_cost_table(net).exits[0].head_macs
    assert head == 3 * 3 * 32 * 13 * 3 + 192 * 12 + 3
    x = torch.randn(2, 64, 25, 5)
    y = x.clone()
    y[:, 32:] = torch.randn(2, 32, 25, 5)  # the other 32 channels do not reach the exit
    ex.eval()
    torch.testing.assert_close(ex(x)[0], ex(y)[0], rtol=0, atol=0)


def test_mobilenet_exit_layers_are_the_papers():
    net = build_network(composed("trecx_mobilenet_vww"), (3, 96, 96))
    ex = net.exits[0]
    assert net.backbone.stage_shapes((3, 96, 96))[net.exit_stages[0]] == (32, 24, 24)
    assert ex.pointwise.out_channels == 64 and ex.depthwise.kernel_size == (2, 2)
    assert ex.num_features == 64 * 3 * 3


def mitigated(seed=0):
    torch.manual_seed(seed)
    net = build_network(composed("trecx_resnet8", "trecx"), (3, 32, 32))
    with torch.no_grad():  # a trained-looking mitigation, not its zero start
        net.final_head.fc.weight.normal_()
    return net.eval()


def test_mitigation_applies_the_exits_filters_to_the_first_final_channels():
    net = mitigated()
    head, ex = net.final_head, net.exits[0]
    x = torch.randn(3, 64, 8, 8)
    dw = ex.depthwise
    # the paper's early view: the exit's own depthwise filters on the first 32 of 64 maps
    z = F.relu(F.conv2d(ex.pad(x[:, :32]), dw.weight, dw.bias, dw.stride, 0, 1, 32))
    expected = head.fc(z.mean((2, 3)))
    torch.testing.assert_close(head(x), expected)
    y = x.clone()
    y[:, 32:] = torch.randn(3, 32, 8, 8)
    torch.testing.assert_close(head(y), head(x), rtol=0, atol=0)
    # tied, not copied: changing the exit's filters changes the mitigation
    with torch.no_grad():
        dw.weight.mul_(2.0)
    assert not torch.allclose(head(x), expected)
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.startswith("final_head.tied") or n.startswith("final_head.view")
                   for n in names)


def test_mitigated_paper_network_dynamic_equals_static():
    net = mitigated()
    x = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        static = net(x)
        p0 = static.logits[0].softmax(1).amax(1)
    policy = create_policy("max_prob", [float(p0.median())])
    out = DynamicEngine(net, policy, exit_cost_table(net).fractions, keep_logits=True)(x)
    assert torch.equal(out.exit, policy.decide(static))
    assert 0 < int((out.exit == 1).sum()) < 48
    chosen = torch.stack(static.logits, 1)[torch.arange(48), out.exit]
    torch.testing.assert_close(out.logits, chosen, rtol=0,
                               atol=FLOOR_FACTOR * float32_floor(net, x))


def test_mitigation_refuses_an_exit_wider_than_the_final_maps():
    b = create_backbone("resnet8_tiny", num_classes=6, in_chans=3)
    with pytest.raises(EENetError, match="exit.width <= 64"):
        build_early_exit_network(b, functools.partial(TRecXExit, width=128), "explicit",
                                 stages=[0], input_size=(3, 16, 16), mitigation="trecx")


def test_a_flattened_grid_fixes_the_input_size():
    net = build_network(composed("trecx_resnet8"), (3, 32, 32)).eval()
    with pytest.raises(EENetError):
        net(torch.randn(1, 3, 40, 40))
    wide = build_network(composed("trecx_resnet8_wide"), (3, 32, 32)).eval()
    assert len(wide(torch.randn(1, 3, 40, 40)).logits) == 2  # global pooling takes any size


@pytest.mark.parametrize("kwargs,match", [
    ({"padding": "valid"}, "unknown T-RecX exit padding"),
    ({"pool": 64}, "larger than the depthwise"),
    ({"width": 99, "pointwise": False}, "the stage has 16"),
    ({"width": 0}, "width must be >= 1"),
    ({"kernel_size": 0}, "must be >= 1"),
])
def test_bad_exit_settings_are_one_clear_error(kwargs, match):
    with pytest.raises(EENetError, match=match):
        TRecXExit(16, 10, (32, 32), **kwargs)


@pytest.mark.parametrize("experiment", [e for e, _, _ in PAPER] + [f"{e}_wide" for e, _, _ in PAPER])
def test_experiment_configs_pass_the_option_checks(experiment):
    from eenet.config_checks import check_train_config

    check_train_config(composed(experiment, "trecx"))
