"""fvcore per-exit cost tables against closed-form counts."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from eenet.build import build_early_exit_network
from eenet.cost import backbone_cost, exit_cost_table, macs_by_module
from eenet.models import EarlyExitNetwork, ExitBlock, create_backbone
from eenet.models.staged import ClassifierHead, StagedBackbone, global_pool


class TinyNet(StagedBackbone):
    """stem: conv 1->2 (3x3, 4x4 map); stage 0: conv 2->4; stage 1: conv 4->4 stride 2; GAP + fc."""

    def __init__(self):
        super().__init__(num_classes=3, in_chans=1, default_input_size=(1, 4, 4))
        stem = nn.Conv2d(1, 2, 3, 1, 1, bias=False)
        stages = [nn.Conv2d(2, 4, 3, 1, 1, bias=False), nn.Conv2d(4, 4, 3, 2, 1, bias=False)]
        head = ClassifierHead(global_pool(), nn.Linear(4, 3), 4)
        self._finish(stem, stages, head, [4, 4], [1, 2], stem_reduction=1)


# closed form, in MACs: a conv costs Cin*Cout*k*k*Hout*Wout; a linear In*Out;
# adaptive average pooling one per input element (fvcore's convention)
STEM = 1 * 2 * 9 * 16          # 288
STAGE0 = 2 * 4 * 9 * 16        # 1152
STAGE1 = 4 * 4 * 9 * 4         # 576
HEAD = 4 * 4 + 4 * 3           # pool over 4x(2x2) + fc: 28
EXIT0 = 4 * 16 + 4 * 3 + 4     # pool over 4x(4x4) + classifier + confidence: 80
BACKBONE = STEM + STAGE0 + STAGE1 + HEAD


def test_backbone_cost_is_closed_form():
    cost = backbone_cost(TinyNet(), (1, 4, 4))
    assert (cost.stem, cost.stages, cost.head) == (STEM, [STAGE0, STAGE1], HEAD)
    assert cost.total == BACKBONE == 2044
    assert cost.cumulative == [STEM + STAGE0, STEM + STAGE0 + STAGE1]


def test_exit_cost_table_is_closed_form_and_counts_exit_heads():
    net = EarlyExitNetwork(TinyNet(), [ExitBlock(4, 3, (4, 4), "pool")], [0], (1, 4, 4))
    table = exit_cost_table(net)
    e0, final = table.exits
    assert table.backbone_macs == BACKBONE
    assert (e0.stage, e0.head_macs, e0.macs) == (0, EXIT0, STEM + STAGE0 + EXIT0)
    # a sample reaching the final exit has paid for exit 0's head as well
    assert (final.stage, final.head_macs, final.macs) == (1, HEAD, BACKBONE + EXIT0)
    assert e0.cost_fraction == pytest.approx((STEM + STAGE0 + EXIT0) / BACKBONE)
    assert final.cost_fraction == pytest.approx(1 + EXIT0 / BACKBONE)
    assert final.cost_fraction > 1


# Closed forms of two well-known networks, from their papers' descriptions (not from the
# modules): what fvcore counts, in MACs, for one input in eval mode is
#   convolution  Cin/groups * Cout * kh * kw * Hout * Wout   (a bias is not counted)
#   linear       In * Out                                    (a bias is not counted)
#   BatchNorm    2 per element of its input (eval mode, affine: a scale and a shift)
#   adaptive average pooling  1 per element of its input
# and ReLU, residual additions, flatten and padding cost nothing.


def conv_macs(cin: int, cout: int, k: int, hw: int) -> int:
    """A k x k convolution with ``hw`` x ``hw`` outputs."""
    return cin * cout * k * k * hw * hw


def bn_macs(c: int, hw: int) -> int:
    return 2 * c * hw * hw


def residual_network(blocks_per_group: int, widths=(16, 32, 64), in_chans=3, size=32, classes=10,
                     shortcut_bn=True) -> dict:
    """Stem conv 3x3 + BN; groups of basic blocks (conv 3x3 + BN, conv 3x3 + BN; the first
    block of groups 2 and 3 has stride 2 and a 1x1 stride-2 projection shortcut, with BN when
    ``shortcut_bn``); global average pooling; fc. Returns the MACs of the stem, of each block
    and of the head, and the totals of each kind of operation."""
    ops = {"conv": 0, "batch_norm": 0, "adaptive_avg_pool2d": 0, "linear": 0}
    stem = conv_macs(in_chans, widths[0], 3, size) + bn_macs(widths[0], size)
    ops["conv"] += conv_macs(in_chans, widths[0], 3, size)
    ops["batch_norm"] += bn_macs(widths[0], size)
    blocks, cin, hw = [], widths[0], size
    for g, cout in enumerate(widths):
        for b in range(blocks_per_group):
            down = g > 0 and b == 0
            hw_out = hw // 2 if down else hw
            convs = conv_macs(cin, cout, 3, hw_out) + conv_macs(cout, cout, 3, hw_out)
            bns = 2 * bn_macs(cout, hw_out)
            if down:  # projection shortcut: 1x1, stride 2
                convs += conv_macs(cin, cout, 1, hw_out)
                bns += bn_macs(cout, hw_out) if shortcut_bn else 0
            blocks.append(convs + bns)
            ops["conv"] += convs
            ops["batch_norm"] += bns
            cin, hw = cout, hw_out
    pool, fc = cin * hw * hw, cin * classes
    ops["adaptive_avg_pool2d"] += pool
    ops["linear"] += fc
    return {"stem": stem, "stages": blocks, "head": pool + fc, "ops": ops,
            "total": stem + sum(blocks) + pool + fc}


def fvcore_by_operator(model, input_size) -> dict:
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(model.eval(), torch.zeros(1, *input_size))
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    return dict(fa.by_operator())


def test_resnet20_at_32x32_is_its_closed_form():
    """He et al. 2016, section 4.2, n = 3, with option B (1x1 conv + BN) projection shortcuts,
    as EENets' ResNets: 40.81 M MACs in convolutions and the fc layer (0.44 M stem, 14.16 M
    in group 1, 13.11 M in each of groups 2 and 3, 640 fc), 0.40 M in BatchNorm, 4,096 pooling."""
    ref = residual_network(3)
    assert ref["ops"]["conv"] + ref["ops"]["linear"] == 40_813_184
    assert ref["total"] == 41_218_688
    b = create_backbone("resnet20", num_classes=10, in_chans=3)
    cost = backbone_cost(b, (3, 32, 32))
    assert (cost.stem, cost.stages, cost.head) == (ref["stem"], ref["stages"], ref["head"])
    assert cost.total == ref["total"]
    # fvcore counts exactly these four kinds of operation, each as the closed form says
    assert fvcore_by_operator(b, (3, 32, 32)) == ref["ops"]


def test_mlperf_tiny_resnet8_is_its_closed_form():
    """Banbury et al. 2021 (MLPerf Tiny image classification): one block per group, 1x1
    shortcuts without BatchNorm, convolution biases (not counted): 12.50 M MACs in
    convolutions and the fc layer, 0.15 M in BatchNorm, 4,096 pooling."""
    ref = residual_network(1, shortcut_bn=False)
    assert ref["ops"]["conv"] + ref["ops"]["linear"] == 12_501_632
    assert ref["total"] == 12_653_184
    b = create_backbone("resnet8_tiny", num_classes=10, in_chans=3)
    cost = backbone_cost(b, (3, 32, 32))
    assert (cost.stem, cost.stages, cost.head) == (ref["stem"], ref["stages"], ref["head"])
    assert fvcore_by_operator(b, (3, 32, 32)) == ref["ops"]


def test_mnist_resnet20_with_fine_exits_costs_and_overhead():
    b = create_backbone("resnet20", num_classes=10, in_chans=1)
    net = build_early_exit_network(b, functools.partial(ExitBlock, preblock="pool"), "fine", 2,
                                   input_size=(1, 28, 28))
    t = exit_cost_table(net)
    assert net.exit_stages == [0, 1]
    fr = t.fractions
    assert fr[0] < fr[1] < 1 < fr[2]
    heads = sum(e.head_macs for e in t.exits[:2])
    assert t.exits[2].macs == t.backbone_macs + heads
    md = t.to_markdown()
    assert "one fused multiply-add = one flop" in md and "exit2" in md


def test_fvcore_convs_and_linears_agree_with_torch_flop_counter():
    """torch counts 2 flops per multiply-add and only matmuls/convs: compare on those ops."""
    torch.manual_seed(0)
    net = EarlyExitNetwork(TinyNet(), [ExitBlock(4, 3, (4, 4), "pool")], [0], (1, 4, 4)).eval()
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(net, torch.zeros(1, 1, 4, 4))
    fa.unsupported_ops_warnings(False)
    ops = fa.by_operator()
    fv = ops.get("conv", 0) + ops.get("linear", 0) + ops.get("addmm", 0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 1, 4, 4))
    assert counter.get_total_flops() == 2 * fv


def test_macs_by_module_restores_training_mode():
    net = TinyNet().train()
    macs_by_module(net, (1, 4, 4))
    assert net.training
