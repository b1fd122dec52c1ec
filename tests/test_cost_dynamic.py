"""The fvcore cost table against the FLOPs a dynamic run really executes.

The reference is ``torch.utils.flop_counter.FlopCounterMode``, which counts the
matrix products a run dispatches (here ``aten.convolution``, ``aten.addmm``,
``aten.mm``) at 2 flops per multiply-add, and nothing else. The cost table
(``eenet.cost.exit_cost_table``, written as cost.json) comes from fvcore tracing
the static path, in MACs, and counts three more things: BatchNorm in eval mode,
2 per element (a scale and a shift), and adaptive average pooling, 1 per
element. So for a dynamic run in which sample b leaves at exit k_b,

    sum_b MACs_table(k_b) = FLOPs_counted / 2 + 2 * (BatchNorm elements) + (pooled elements),

where the two element counts are measured in the same run by forward hooks on
every BatchNorm and adaptive pooling module (so they cover exactly the modules
the engine ran, on exactly the samples still in the batch). Every term is an
integer: the comparison is exact, no tolerance. MACs_table(k) is the table's
MACs to reach exit k, less the heads of idle early exits before k (threshold
``inf``), which the engine does not run unless the policy needs every exit
(patience) or the head's features feed the final exit (``always_run``).

Exit distributions are known: thresholds that send every sample to exit k
(``inf`` before k, ``-inf`` at k), and a mixed batch whose exits are computed
from the static forward with a plain loop over samples.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from eenet.build import build_early_exit_network
from eenet.cost import CostTable, exit_cost_table
from eenet.inference import DynamicEngine
from eenet.models import ExitBlock, create_backbone
from eenet.models.trecx import TRecXExit
from eenet.policies import create_policy

COUNTED = {"aten.convolution", "aten.addmm", "aten.mm"}


def network(kind: str):
    torch.manual_seed(0)
    if kind == "resnet20_plain_stats":  # the digits default: flatten, stats confidence head
        b = create_backbone("resnet20", num_classes=10, in_chans=1, input_size=(8, 8))
        exit_block = functools.partial(ExitBlock, preblock="plain", confidence_input="stats")
        return build_early_exit_network(b, exit_block, "explicit", stages=[1, 3, 5, 7],
                                        input_size=(1, 8, 8))
    if kind == "resnet20_bnpool_conv":  # BatchNorm and pooling inside the exits too
        b = create_backbone("resnet20", num_classes=10, in_chans=1, input_size=(8, 8))
        exit_block = functools.partial(ExitBlock, preblock="bnpool", convs=1)
        return build_early_exit_network(b, exit_block, "explicit", stages=[0, 4],
                                        input_size=(1, 8, 8))
    # MLPerf Tiny ResNet-8 with T-RecX's exit (depthwise conv) and either mitigation:
    # trecx (tied filters on the final maps) or concat (exit 0's features carried: always run)
    mitigation = kind.split("_")[-1]
    b = create_backbone("resnet8_tiny", num_classes=10, in_chans=3, input_size=(16, 16))
    return build_early_exit_network(b, functools.partial(TRecXExit, width=64), "explicit",
                                    stages=[0, 1], input_size=(3, 16, 16), mitigation=mitigation)


NETWORKS = ["resnet20_plain_stats", "resnet20_bnpool_conv", "resnet8_trecx", "resnet8_concat"]


def measured_run(engine: DynamicEngine, net: nn.Module, x: torch.Tensor) -> dict:
    """One dynamic run under FlopCounterMode, with BatchNorm and pooling elements counted."""
    elements = {"bn": 0, "pool": 0}

    def hook(key):
        def count(module, inputs, output):
            elements[key] += inputs[0].numel()
        return count

    handles = [m.register_forward_hook(hook("bn")) for m in net.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles += [m.register_forward_hook(hook("pool")) for m in net.modules()
                if isinstance(m, nn.AdaptiveAvgPool2d)]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = engine(x)
    finally:
        for h in handles:
            h.remove()
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return {"out": out, "flops": counter.get_total_flops(), "ops": ops, **elements}


def table_macs(table: CostTable, exit_k: int, thresholds: list[float], policy: str) -> int:
    """MACs of reaching exit k from the table: the heads of idle exits before k left out."""
    macs = table.exits[exit_k].macs
    if policy == "patience":  # its scores count every exit's prediction: every head runs
        return macs
    for j in range(exit_k):
        if math.isinf(thresholds[j]) and thresholds[j] > 0 and j not in table.always_run:
            macs -= table.exits[j].head_macs
    return macs


def check_run(net, table: CostTable, policy: str, thresholds: list[float], x: torch.Tensor,
              expected_exits: torch.Tensor) -> dict:
    engine = DynamicEngine(net, create_policy(policy, thresholds), table)
    run = measured_run(engine, net, x)
    assert torch.equal(run["out"].exit, expected_exits)
    assert set(run["ops"]) <= COUNTED, run["ops"]
    table_total = sum(table_macs(table, int(k), thresholds, policy) for k in expected_exits)
    assert run["flops"] % 2 == 0
    assert table_total == run["flops"] // 2 + 2 * run["bn"] + run["pool"], run
    # the engine reports the same cost per sample, from the table's fractions
    assert float(run["out"].cost.double().sum()) * table.backbone_macs == pytest.approx(
        table_total, rel=1e-6)  # float32 fractions: relative error ~1e-7 per sample
    return run


def test_flop_counter_counts_two_flops_per_multiply_add_and_no_batchnorm():
    """The reference's own convention, on closed forms: a linear layer 2*B*In*Out, a 3x3
    convolution 2*B*Cin*Cout*9*H*W; BatchNorm, ReLU and pooling add nothing."""
    lin = nn.Linear(7, 3)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1)).eval()
    for module, x, macs in ((lin, torch.zeros(5, 7), 5 * 7 * 3),
                            (conv, torch.zeros(5, 2, 6, 6), 5 * 2 * 4 * 9 * 36)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(x)
        assert counter.get_total_flops() == 2 * macs


@pytest.mark.parametrize("kind", NETWORKS)
def test_every_sample_at_exit_k_costs_the_tables_macs_to_exit_k(kind):
    net = network(kind).eval()
    table = CostTable.from_dict(exit_cost_table(net).to_dict())  # as cost.json holds it
    assert table.always_run == ([0] if kind == "resnet8_concat" else [])
    n = net.num_exits - 1
    x = torch.randn(6, *net.input_size)
    for k in range(n + 1):
        # inf before k (idle: their heads are skipped), -inf at k (every sample leaves)
        thresholds = [math.inf] * k + [-math.inf] * (n - k)
        check_run(net, table, "confidence", thresholds, x, torch.full((6,), k))
        # every head paid for: plain fractions make the engine run every head
        engine = DynamicEngine(net, create_policy("confidence", thresholds), table.fractions)
        run = measured_run(engine, net, x)
        assert 6 * table.exits[k].macs == run["flops"] // 2 + 2 * run["bn"] + run["pool"]
    # batch size 1 takes the engine's short path: the same costs, sample by sample
    for k in range(n + 1):
        thresholds = [math.inf] * k + [-math.inf] * (n - k)
        check_run(net, table, "confidence", thresholds, x[:1], torch.tensor([k]))


def static_exits(net, x: torch.Tensor, policy: str, thresholds: list[float]) -> torch.Tensor:
    """Each sample's exit from the static forward, by a plain loop: the first early exit
    whose score passes its threshold (in score units), else the final exit."""
    pol = create_policy(policy, thresholds)
    with torch.no_grad():
        scores = pol.scores(net(x))
    t = pol.threshold_vector(scores.shape[1]).tolist()
    out = []
    for b in range(x.shape[0]):
        k = next((i for i in range(scores.shape[1]) if float(scores[b, i]) > t[i]), len(t))
        out.append(k)
    return torch.tensor(out)


@pytest.mark.parametrize("kind", NETWORKS)
def test_a_mixed_batch_costs_the_sum_of_its_samples_table_macs(kind):
    """Thresholds at quantiles of each exit's max-softmax scores send samples to every exit;
    one early exit is idle (inf), so its head is not run and not charged."""
    net = network(kind).eval()
    table = exit_cost_table(net)
    n = net.num_exits - 1
    x = torch.randn(40, *net.input_size)
    with torch.no_grad():
        scores = create_policy("max_prob").scores(net(x))
    thresholds = [float(torch.quantile(scores[:, i], 0.7)) for i in range(n)]
    thresholds[n // 2] = math.inf
    expected = static_exits(net, x, "max_prob", thresholds)
    assert len(set(expected.tolist())) >= min(3, n), expected  # a mix, not one exit
    run = check_run(net, table, "max_prob", thresholds, x, expected)
    assert run["out"].exit.bincount(minlength=n + 1)[n // 2] == 0
    # patience needs every exit's prediction: an idle exit's head still runs and is paid
    thresholds = [2.0] * n
    thresholds[0] = math.inf
    check_run(net, table, "patience", thresholds, x, static_exits(net, x, "patience", thresholds))
