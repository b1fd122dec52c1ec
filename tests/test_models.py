"""Backbones, exit blocks, placement and the early-exit network."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torchvision
from torch import nn

from eenet.build import build_early_exit_network
from eenet.errors import EENetError
from eenet.losses import EENetLoss, MultiExitCE
from eenet.models import (EarlyExitNetwork, ExitBlock, create_backbone, list_backbones,
                          load_state_dict_checked, place_exits)
from eenet.models.placement import PHI, cost_targets
from eenet.models.torchvision_resnet import TorchvisionResNet

# backbones that need 32x32 test inputs (they reduce by 32 or require >= 32x32), with the
# constructor arguments that keep them cheap there
SMALL = {"resnet18": dict(small_input=True), "resnet34": dict(small_input=True),
         "resnet50": dict(small_input=True), "vgg11_bn": dict(small_input=True),
         "vgg16_bn": dict(small_input=True), "densenet121": {}, "cifar_vgg11_bn": {},
         "cifar_vgg16_bn": {}}


def make_backbone(name: str, in_chans: int = 3, num_classes: int = 7, size=(16, 16)):
    kw = dict(num_classes=num_classes, in_chans=in_chans, input_size=size, **SMALL.get(name, {}))
    return create_backbone(name, **kw)


def test_registry_lists_the_issue_backbones():
    expected = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8_tiny",
                "resnet18", "resnet34", "resnet50"}
    assert expected <= set(list_backbones())


def test_unknown_backbone_is_one_clear_line():
    with pytest.raises(EENetError) as err:
        create_backbone("resnet21")
    msg = str(err.value)
    assert "resnet21" in msg and "resnet20" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet8_tiny", "resnet18", "resnet50"])
@pytest.mark.parametrize("in_chans,size", [(1, (8, 8)), (1, (28, 28)), (3, (32, 32))])
def test_stage_info_matches_real_shapes(name, in_chans, size):
    b = make_backbone(name, in_chans=in_chans, size=size).eval()
    shapes = b.stage_shapes((in_chans, *size))
    assert len(shapes) == len(b.stage_info) == b.num_stages
    for info, (c, h, w) in zip(b.stage_info, shapes):
        assert info.channels == c
        assert h == -(-size[0] // info.reduction)  # ceil: stride-2 convs with padding 1
    x = torch.randn(2, in_chans, *size)
    y = b(x)
    assert y.shape == (2, 7)
    torch.testing.assert_close(b.forward_head(b.forward_features(x)), y)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_has_6n_plus_2_weighted_layers(depth):
    b = create_backbone(f"resnet{depth}", num_classes=10, in_chans=3)
    convs = [m for n, m in b.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    linears = [m for m in b.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth
    assert b.num_stages == (depth - 2) // 2  # one stage per basic block
    assert [s.channels for s in b.stage_info][:: (depth - 2) // 6] == [16, 32, 64]


def test_mlperf_tiny_resnet8_matches_reference_size():
    b = create_backbone("resnet8_tiny", num_classes=10, in_chans=3)
    # the Keras reference reports 78,666 parameters, BatchNorm moving statistics included
    keras_count = sum(p.numel() for p in b.parameters()) + sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in b.modules() if isinstance(m, nn.BatchNorm2d))
    assert keras_count == 78_666
    assert [s.channels for s in b.stage_info] == [16, 32, 64]
    assert [s.reduction for s in b.stage_info] == [1, 2, 4]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_stages_then_head_equal_the_original_model(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=5).eval()
    staged = TorchvisionResNet(model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = staged(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the staged view shares the model's modules: same parameters, nothing copied
    assert {id(p) for p in staged.parameters()} == {id(p) for p in model.parameters()}
    assert staged.stage_info[-1].reduction == 32


def test_torchvision_weights_without_network_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    with pytest.raises(EENetError, match="could not load torchvision weights"):
        create_backbone("resnet18", num_classes=10, weights="IMAGENET1K_V1")


@pytest.mark.parametrize("preblock", ["pool", "bnpool", "plain"])
@pytest.mark.parametrize("convs", [0, 2])
def test_exit_block_shapes(preblock, convs):
    e = ExitBlock(16, 10, in_size=(7, 7), preblock=preblock, convs=convs, width=8)
    logits, z = e(torch.randn(3, 16, 7, 7))
    assert logits.shape == (3, 10) and z.shape == (3,)
    assert isinstance(e.confidence, nn.Linear) and e.confidence.out_features == 1


@pytest.mark.parametrize("preblock", ["pool", "plain"])
def test_strided_widening_exit_block(preblock):
    """stride 2 halves the maps at each conv (7 -> 4 -> 2), width_growth 2 doubles the channels."""
    e = ExitBlock(16, 10, in_size=(7, 7), preblock=preblock, convs=2, width=8, stride=2,
                  width_growth=2.0)
    convs = [m for m in e.pre if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in convs] == [(16, 8, (2, 2)),
                                                                         (8, 16, (2, 2))]
    assert e.pre(torch.randn(3, 16, 7, 7)).shape == (3, 16 if preblock == "pool" else 16 * 2 * 2)
    logits, z = e(torch.randn(3, 16, 7, 7))
    assert logits.shape == (3, 10) and z.shape == (3,)
    with pytest.raises(EENetError, match="stride"):
        ExitBlock(16, 10, convs=1, stride=0)


@pytest.mark.parametrize("k", [1, 2, 10])
def test_prediction_stats_follow_their_definitions(k):
    from eenet.models.exits import prediction_stats
    # moderate logits: near p_max = 1, float32's 1 - p_max keeps too few digits to compare
    logits = torch.randn(300, k, generator=torch.Generator().manual_seed(k)) * 2
    logits[0] = 0.0                      # uniform prediction
    p = torch.softmax(logits.double(), 1)
    top = p.topk(min(2, k), 1).values
    p_max = top[:, 0]
    margin = top[:, 0] - (top[:, 1] if k > 1 else 0)
    ent = -(p * p.log()).sum(1) / math.log(max(k, 2))
    # logit(p_max), with p_max capped just below 1 (float32 1 - 1e-7) so that it stays finite
    cap = torch.tensor(1 - 1e-7, dtype=torch.float32).double()
    logit = (p_max.log() - torch.log1p(-p_max.clamp(max=cap))).clamp(-20, 20)
    expected = torch.stack([logit, margin, ent], 1).float()
    torch.testing.assert_close(prediction_stats(logits), expected, rtol=1e-4, atol=2e-4)
    if k > 1:  # a saturated prediction gives the capped, finite logit -log(1 - cap)
        sat = prediction_stats(torch.tensor([[60.0] + [0.0] * (k - 1)]))
        assert sat[0, 0].item() == pytest.approx(-math.log(1 - cap.item()), rel=1e-3)
        assert sat[0, 1].item() == pytest.approx(1.0) and sat[0, 2].item() == pytest.approx(0, abs=1e-6)


def test_exit_block_rejects_unknown_preblock():
    with pytest.raises(EENetError, match="accepted: pool, bnpool, plain"):
        ExitBlock(16, 10, preblock="maxpool")


def _ee(name="resnet20", preblock="pool", placement="fine", n=2, stages=None, in_chans=1,
        size=(12, 12), classes=7):
    b = make_backbone(name, in_chans=in_chans, num_classes=classes, size=size)
    return build_early_exit_network(b, functools.partial(ExitBlock, preblock=preblock), placement,
                                    n, stages, input_size=(in_chans, *size))


@pytest.mark.parametrize("name", sorted(list_backbones()))
@pytest.mark.parametrize("preblock", ["pool", "bnpool", "plain"])
def test_every_parameter_gets_a_gradient_from_the_eenet_loss(name, preblock):
    torch.manual_seed(0)
    size = (32, 32) if name in SMALL else (12, 12)
    net = _ee(name, preblock, "explicit", stages=[0, 1], size=size).train()
    x, y = torch.randn(4, 1, *size), torch.randint(0, 7, (4,))
    out = net(x)
    costs = torch.linspace(0.2, 1.05, net.num_exits)
    EENetLoss(version=2, lambda_coef=1.0)(out, y, costs)["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_multi_ce_trains_everything_but_the_confidence_heads():
    net = _ee().train()
    out = net(torch.randn(4, 1, 12, 12))
    MultiExitCE()(out, torch.randint(0, 7, (4,)), torch.ones(3))["loss"].backward()
    for n, p in net.named_parameters():
        if ".confidence." in n:
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_static_path_final_exit_is_the_backbone():
    torch.manual_seed(0)
    net = _ee().eval()
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        out = net(x)
        plain = net.backbone(x)
    assert len(out.logits) == len(out.conf_logits) == net.num_exits == 3
    torch.testing.assert_close(out.logits[-1], plain, rtol=0, atol=0)
    assert torch.all(out.confidences[-1] == 1)
    assert all(((h > 0) & (h < 1)).all() for h in out.confidences[:-1])


def test_segments_run_every_module_once_in_order():
    net = _ee(placement="explicit", stages=[1, 4])
    segs = net.segments()
    modules = [m for mods, _ in segs for m in mods]
    assert modules == [net.backbone.stem, *net.backbone.stages]
    assert [e for _, e in segs] == [net.exits[0], net.exits[1], None]
    assert [len(m) for m, _ in segs] == [3, 3, 4]


def test_plain_network_has_no_early_exits():
    net = _ee(placement="explicit", stages=[])
    out = net(torch.randn(2, 1, 12, 12))
    assert net.num_exits == 1 and len(out.logits) == 1


def test_wrong_input_shape_names_the_expected_shape():
    net = _ee(preblock="plain")
    with pytest.raises(EENetError, match=r"expected \(batch, 1, 12, 12\)"):
        net(torch.randn(2, 3, 12, 12))
    with pytest.raises(EENetError, match=r"expected \(batch, 1, 12, 12\)"):
        net(torch.randn(2, 1, 16, 16))
    pooled = _ee(preblock="pool")
    pooled(torch.randn(1, 1, 16, 16))  # pooled exits accept any size
    with pytest.raises(EENetError, match=r"expected \(batch, 1, H, W\)"):
        pooled(torch.randn(1, 12, 12))


def test_checkpoint_mismatch_names_the_keys():
    net = _ee()
    sd = net.state_dict()
    sd.pop("exits.0.classifier.weight")
    sd["exits.9.bias"] = torch.zeros(1)
    with pytest.raises(EENetError) as err:
        load_state_dict_checked(net, sd)
    assert "exits.0.classifier.weight" in str(err.value) and "exits.9.bias" in str(err.value)


# ---- placement -------------------------------------------------------------------------------

def test_cost_targets_follow_the_eenets_formulas():
    F, N = 1000.0, 3
    assert cost_targets("fine", N, F) == pytest.approx([F * (1 - 0.95 ** (i + 1)) for i in range(N)])
    assert cost_targets("pareto", N, F) == pytest.approx([F * (1 - 0.8 ** (i + 1)) for i in range(N)])
    assert cost_targets("linear", N, F) == pytest.approx([250, 500, 750])
    assert cost_targets("gold_ratio", N, F) == pytest.approx([F * PHI ** (i - N) for i in range(N)])


def test_placement_takes_the_first_stage_reaching_each_target():
    cum = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]  # 10 equal stages, F = 1000
    assert place_exits("linear", 3, cum, 1000) == [2, 4, 7]  # targets 250, 500, 750
    assert place_exits("gold_ratio", 2, cum, 1000) == [3, 6]  # targets 382, 618
    # fine: targets 50 and 97.5 both fall in stage 0; the second exit moves to stage 1
    assert place_exits("fine", 2, cum, 1000) == [0, 1]
    assert place_exits("pareto", 3, cum, 1000) == [1, 3, 4]  # 200, 360, 488


def test_placement_errors_are_clear():
    cum = [100, 200, 300, 400]
    with pytest.raises(EENetError, match="do not fit"):
        place_exits("pareto", 4, cum, 400)
    with pytest.raises(EENetError, match="accepted: explicit, fine"):
        place_exits("uniform", 2, cum, 400)
    with pytest.raises(EENetError, match="out of range"):
        place_exits("explicit", 1, cum, 400, stages=[3])
    with pytest.raises(EENetError, match="strictly increasing"):
        place_exits("explicit", 2, cum, 400, stages=[1, 0])


def test_fine_placement_on_resnet20_puts_exits_after_the_first_blocks():
    net = _ee("resnet20", placement="fine", n=2, size=(28, 28))
    assert net.exit_stages == [0, 1]


def test_network_rejects_stages_out_of_range():
    b = make_backbone("resnet20", in_chans=1)
    with pytest.raises(EENetError):
        EarlyExitNetwork(b, [nn.Identity()], [8], (1, 16, 16))
