"""The dynamic engine equals the static path + policy, and really skips computation."""

from __future__ import annotations

import copy
import functools
import math
import statistics
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from eenet.build import build_early_exit_network
from eenet.cost import exit_cost_table
from eenet.errors import EENetError
from eenet.calibration import Calibrator, cache_exit_outputs
from eenet.inference import DynamicEngine, exit_latency_table, fold_batchnorm
from eenet.inference.latency import run_to_exit
from eenet.models import ExitBlock, create_backbone
from eenet.policies import POLICIES, create_policy


def make_net(name="resnet20", stages=(0, 2, 5), preblock="pool", seed=0, size=12):
    torch.manual_seed(seed)
    b = create_backbone(name, num_classes=5, in_chans=1)
    net = build_early_exit_network(b, functools.partial(ExitBlock, preblock=preblock), "explicit",
                                   stages=list(stages), input_size=(1, size, size))
    # random BatchNorm statistics, so eval mode differs from train mode
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


NET = make_net()
NET64 = copy.deepcopy(NET).double()
COSTS = exit_cost_table(NET).fractions


def float32_floor(net, x, net64=None):
    """The static path's own float32 rounding: max |logits - logits in float64| over every exit.

    The dynamic path runs the same modules on sub-batches of other sizes, so its float32
    rounding differs from the static path's; each of the two is off the float64 value by
    about this much. Comparisons allow FLOOR_FACTOR times it: the two errors add (2x), and
    the largest of a different draw of roundings may land higher (2x). Measured (one and
    two threads): the dynamic/static difference is 0 on most batches and at most 1.8x
    this floor (30 random batches; the batch-1 path; T-RecX networks; folded BatchNorm).
    """
    net64 = net64 if net64 is not None else copy.deepcopy(net).double()
    with torch.no_grad():
        a, b = net(x), net64(x.double())
    return max(float((p.double() - q).abs().max()) for p, q in zip(a.logits, b.logits))


#: see :func:`float32_floor`
FLOOR_FACTOR = 4


def thresholds_for(name, data, n):
    if name == "patience":
        return [data.draw(st.integers(1, 3)) for _ in range(n)]
    lo, hi = {"confidence": (0.0, 1.0), "max_prob": (0.2, 1.0), "entropy": (-1.7, 0.0)}[name]
    return [data.draw(st.floats(lo, hi, exclude_min=True, exclude_max=True)) for _ in range(n)]


@given(st.sampled_from(sorted(POLICIES)), st.integers(1, 40), st.integers(0, 10_000), st.data())
@settings(max_examples=40, deadline=None)
def test_dynamic_equals_static_then_policy(name, batch, seed, data):
    policy = create_policy(name, thresholds_for(name, data, NET.num_exits - 1))
    x = torch.randn(batch, 1, 12, 12, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        static = NET(x)
    exits = policy.decide(static)
    expected_pred = torch.stack(static.logits, 1)[torch.arange(batch), exits].argmax(1)
    out = DynamicEngine(NET, policy, COSTS, keep_logits=True)(x)
    assert torch.equal(out.exit, exits)
    assert torch.equal(out.pred, expected_pred)
    assert torch.equal(out.cost, torch.tensor(COSTS)[exits])  # the same float32 values, gathered
    chosen = torch.stack(static.logits, 1)[torch.arange(batch), exits]
    tol = FLOOR_FACTOR * float32_floor(NET, x, NET64)
    torch.testing.assert_close(out.logits, chosen, rtol=0, atol=tol)


class CallCounter:
    def __init__(self, modules):
        self.calls = {name: 0 for name in modules}
        self.rows = {name: 0 for name in modules}
        for name, m in modules.items():
            m.register_forward_hook(self._hook(name))

    def reset(self):
        self.calls = dict.fromkeys(self.calls, 0)
        self.rows = dict.fromkeys(self.rows, 0)

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name] += 1
            self.rows[name] += inputs[0].shape[0]
        return hook


def counted_net():
    net = make_net(stages=(1, 4))
    mods = {f"stage{k}": s for k, s in enumerate(net.backbone.stages)}
    mods.update({f"exit{j}": e for j, e in enumerate(net.exits)})
    mods["head"] = net.backbone.head.fc
    return net, CallCounter(mods)


def median_thresholds(net, x, name="max_prob"):
    """Per-exit thresholds at the median score, so about half of the batch leaves at each exit."""
    with torch.no_grad():
        scores = create_policy(name).scores(net(x))
    return scores.median(0).values.tolist()


def test_later_stages_do_not_run_when_every_sample_has_left():
    net, counter = counted_net()
    engine = DynamicEngine(net, create_policy("confidence", [-math.inf, math.inf]))  # all leave at 0
    out = engine(torch.randn(16, 1, 12, 12))
    assert (out.exit == 0).all()
    assert counter.calls["stage0"] == counter.calls["stage1"] == counter.calls["exit0"] == 1
    assert all(counter.calls[f"stage{k}"] == 0 for k in range(2, 9))
    assert counter.calls["exit1"] == counter.calls["head"] == 0


def test_later_stages_run_only_on_the_samples_that_remain():
    net, counter = counted_net()
    x = torch.randn(64, 1, 12, 12)
    policy = create_policy("max_prob", median_thresholds(net, x))
    counter.reset()
    out = DynamicEngine(net, policy)(x)
    n0 = int((out.exit == 0).sum())
    n1 = int((out.exit == 1).sum())
    assert 0 < n0 < 64, "the test needs a split batch; change the thresholds"
    assert counter.rows["stage2"] == 64 - n0          # after exit 0, only the rest goes on
    assert counter.rows["stage5"] == 64 - n0 - n1     # after exit 1, fewer still
    assert counter.rows["head"] == int((out.exit == 2).sum())


def test_batch_of_one_both_ways():
    net, counter = counted_net()
    x = torch.randn(1, 1, 12, 12)
    early = DynamicEngine(net, create_policy("confidence", [-math.inf, math.inf]))(x)
    assert early.exit.tolist() == [0] and counter.calls["stage8"] == 0
    late = DynamicEngine(net, create_policy("confidence", [math.inf, math.inf]))(x)
    assert late.exit.tolist() == [2] and counter.calls["stage8"] == 1
    with torch.no_grad():
        assert torch.equal(late.pred, net.backbone(x).argmax(1))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_batch_of_one_short_path_equals_the_batched_path(name):
    """Each sample run alone (the batch-1 path) leaves where it leaves in a batch of 48."""
    net = make_net(stages=(1, 4), seed=4)  # a seed whose exits 0 and 1 agree on 15 of 48
    with torch.no_grad():  # varied predictions, so that exits sometimes agree (patience)
        for head in [e.classifier for e in net.exits] + [net.backbone.head.fc]:
            head.weight.normal_(0, 1)
    x = torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    if name == "patience":
        policy = create_policy(name, [2, 2])  # exit 0 never agrees with an earlier exit
    else:
        with torch.no_grad():
            scores = create_policy(name).scores(net(x))
        # halfway between two samples' scores: a sample's own score would sit on the
        # boundary, where batch-1 and batch-48 convolutions may round differently
        srt = scores.sort(0).values
        th = (srt[23] + srt[24]) / 2
        policy = create_policy(name, th.tolist())  # scores and thresholds share units
    engine = DynamicEngine(net, policy, exit_cost_table(net).fractions, keep_logits=True)
    batched = engine(x)
    alone = [engine(x[i:i + 1]) for i in range(48)]
    used = set(batched.exit.tolist())
    assert used == ({1, 2} if name == "patience" else {0, 1, 2}), "the test needs every exit used"
    assert torch.equal(torch.cat([o.exit for o in alone]), batched.exit)
    assert torch.equal(torch.cat([o.pred for o in alone]), batched.pred)
    assert torch.equal(torch.cat([o.cost for o in alone]), batched.cost)
    tol = FLOOR_FACTOR * float32_floor(net, x)  # batch 1 and batch 48 round differently
    torch.testing.assert_close(torch.cat([o.logits for o in alone]), batched.logits,
                               rtol=0, atol=tol)
    assert all(o.exit.dtype == torch.long and o.exit.shape == (1,) for o in alone)


def test_engine_refuses_training_mode_and_bad_shapes():
    net = make_net().train()
    engine = DynamicEngine(net, create_policy("confidence", 0.5))
    with pytest.raises(EENetError, match="eval mode only"):
        engine(torch.randn(2, 1, 12, 12))
    net.eval()
    with pytest.raises(EENetError, match=r"expected \(batch, 1, H, W\)"):
        engine(torch.randn(2, 3, 12, 12))


def test_dynamic_run_executes_the_flops_the_cost_table_charges():
    """torch's FlopCounterMode sees what really ran: it must match the per-exit table."""
    net = make_net(stages=(1, 4))
    x = torch.randn(32, 1, 12, 12)
    th = median_thresholds(net, x)
    out = DynamicEngine(net, create_policy("max_prob", th))(x)
    assert len(set(out.exit.tolist())) == 3
    per_exit = flops_per_exit(net, x[:1])
    counter = FlopCounterMode(display=False)
    with counter:
        DynamicEngine(net, create_policy("max_prob", th))(x)
    expected = sum(per_exit[int(e)] for e in out.exit)
    assert counter.get_total_flops() == expected
    assert per_exit[0] < per_exit[1] < per_exit[2]


@pytest.mark.parametrize("batch", [1, 32])
def test_idle_exits_do_not_run_their_heads_and_are_not_charged(batch):
    """An exit whose threshold is inf releases no sample: its head is skipped and not paid."""
    net = make_net(stages=(0, 2, 5))
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(3))[:batch]
    th = median_thresholds(net, torch.randn(32, 1, 12, 12))
    th[1] = math.inf                                    # exit 1 idle
    policy = create_policy("max_prob", th)
    table = exit_cost_table(net)
    calls = [0, 0, 0]
    hooks = [e.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, e in enumerate(net.exits)]
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            out = DynamicEngine(net, policy, table)(x)
    finally:
        for h in hooks:
            h.remove()
    assert calls[1] == 0 and calls[0] == 1
    with torch.no_grad():
        static = net(x)
    assert torch.equal(out.exit, policy.decide(static))  # same decisions as with every head
    assert 1 not in out.exit.tolist()
    # what ran, per sample: stages up to its exit and the heads of the exits it passed,
    # exit 1's head excluded; the cost table's skipping fractions say the same in MACs
    per_exit = flops_per_exit(net, x[:1])
    head1 = _head_only(net, x[:1], 1)
    assert head1 > 0
    expected = sum(per_exit[e] - (head1 if e >= 1 else 0) for e in out.exit.tolist())
    assert counter.get_total_flops() == expected
    fr = table.fractions_skipping([False, True, False])
    assert fr[1] < table.fractions[1] and fr[0] == table.fractions[0]
    assert torch.equal(out.cost, torch.tensor(fr, dtype=torch.float32)[out.exit])
    # the calibrator, given the cost table, charges the same on the same samples
    cached = cache_exit_outputs(net, [(x, torch.zeros(batch, dtype=torch.long))])
    cal = Calibrator(cached, "max_prob", table)
    _, cost, _ = cal.evaluate(policy.threshold_vector(3).view(1, -1))
    # the engine stores the fractions in float32 (relative rounding <= 2**-24 each, so also for
    # their mean), the calibrator in float64 (sums: ~1e-15): twice the float32 unit roundoff
    assert float(cost[0]) == pytest.approx(float(out.cost.double().mean()), rel=2 ** -23, abs=0)
    # a plain list of fractions counts every head, so the engine runs every head
    assert DynamicEngine(net, policy, table.fractions).skipped == [False, False, False]
    # the patience policy needs every exit's prediction: nothing is skipped
    assert DynamicEngine(net, create_policy("patience", [math.inf] * 3), table).skipped == [
        False, False, False]


def flops_per_exit(net, x):
    """matmul/conv FLOPs of ``x`` leaving at each exit i: the stages and every head 0..i."""
    out = []
    for i in range(net.num_exits):
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            run_to_exit(net, x, i)
        out.append(counter.get_total_flops())
    return out


def _head_only(net, x, j):
    """FLOPs of early exit j's head alone on the features it reads."""
    with torch.inference_mode():
        feats = x
        for k, seg in enumerate(net.segments()):
            for m in seg[0]:
                feats = m(feats)
            if k == j:
                break
    c = FlopCounterMode(display=False)
    with c, torch.inference_mode():
        net.exits[j](feats)
    return c.get_total_flops()


def test_latency_table_reports_what_it_timed_and_the_first_exit_is_faster(monkeypatch):
    """Each row summarises timings of runs to that exit, at that batch size, in eval mode;
    and reaching exit 0 takes less time than reaching the final exit.

    The timing claim is made robust instead of machine-specific: exit 0 (after stage 0
    of 9) does about an eighth of the final exit's MACs and a tenth of its module calls,
    and the test asks only that the final exit's 25th percentile lies above exit 0's
    75th percentile, among the very samples the table took its medians from: the two
    medians must differ by more than half of each one's interquartile spread. Load from
    other processes only adds time (timeslices of milliseconds), and rarely to more than
    a quarter of exit 0's short runs; on a busy 2-core machine (load 7) the quartiles
    were 0.2-1.0 ms against 1.5-17 ms in 5 of 5 trials.
    """
    from eenet.inference import latency

    net = make_net(stages=(0, 4), size=16).train()  # the table must switch it to eval mode
    fractions = exit_cost_table(net, (1, 16, 16)).fractions
    assert fractions[-1] > 4 * fractions[0]  # the premise: a wide gap in work
    calls, samples = [], []
    real_run, real_median = latency.run_to_exit, statistics.median

    def run(n, x, i):
        calls.append((x.shape[0], i, n.training))
        return real_run(n, x, i)

    def median(values):  # the samples behind each row's median, in row order
        samples.append(list(values))
        return real_median(values)

    monkeypatch.setattr(latency, "run_to_exit", run)
    monkeypatch.setattr(latency, "statistics", types.SimpleNamespace(median=median))
    repeats, warmup, sizes = 15, 2, (1, 8)
    rows = exit_latency_table(net, (1, 16, 16), batch_sizes=sizes, repeats=repeats, warmup=warmup)
    assert net.training  # its mode is given back
    order = [(bs, i) for bs in sizes for i in range(3)]
    assert [(int(r["exit"][4:]), r["batch_size"]) for r in rows] == [(i, bs) for bs, i in order]
    # every measurement ran to the row's exit at the row's batch size, in eval mode
    assert calls == [(bs, i, False) for bs, i in order for _ in range(warmup + repeats)]
    assert [len(s) for s in samples] == [repeats] * len(rows)
    for r, s in zip(rows, samples):
        final = rows[3 * sizes.index(r["batch_size"]) + 2]
        assert r["repeats"] == repeats
        assert r["ms_per_batch"] == 1e3 * real_median(s)
        # the same quotients computed in another order: a few float64 roundings (2**-53 each)
        assert r["us_per_sample"] == pytest.approx(1e3 * r["ms_per_batch"] / r["batch_size"],
                                                   rel=2 ** -50)
        assert r["fraction_of_final"] == pytest.approx(r["ms_per_batch"] / final["ms_per_batch"],
                                                       rel=2 ** -50)
    for k in range(len(sizes)):
        first, last = samples[3 * k], samples[3 * k + 2]
        q_first, q_last = statistics.quantiles(first, n=4), statistics.quantiles(last, n=4)
        assert q_last[0] > q_first[2], (sizes[k], q_first, q_last)


# ---- T-RecX: the final exit helped by the early exit -------------------------------------------

def trecx_net(mode, seed=0):
    from eenet.models.trecx import TRecXExit

    torch.manual_seed(seed)
    b = create_backbone("resnet8_tiny", num_classes=6, in_chans=3)
    net = build_early_exit_network(b, functools.partial(TRecXExit, width=64), "explicit",
                                   stages=[0], input_size=(3, 16, 16), mitigation=mode)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("mode", [None, "trecx", "concat"])
def test_mitigated_networks_dynamic_equals_static(mode):
    net = trecx_net(mode).eval()
    with torch.no_grad():  # a trained-looking final head: not the zero initialisation
        if net.final_head is not None:
            net.final_head.fc.weight.normal_()
    x = torch.randn(40, 3, 16, 16)
    th = median_thresholds(net, x)
    policy = create_policy("max_prob", th)
    with torch.no_grad():
        static = net(x)
    out = DynamicEngine(net, policy, exit_cost_table(net).fractions, keep_logits=True)(x)
    assert torch.equal(out.exit, policy.decide(static))
    assert 0 < int((out.exit == 1).sum()) < 40
    chosen = torch.stack(static.logits, 1)[torch.arange(40), out.exit]
    torch.testing.assert_close(out.logits, chosen, rtol=0, atol=FLOOR_FACTOR * float32_floor(net, x))


@pytest.mark.parametrize("mode", ["trecx", "concat"])
def test_mitigation_starts_as_the_plain_final_exit_and_trains_every_parameter(mode):
    net = trecx_net(mode).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 6, (8,))
    out = net(x)
    # the mitigation's dense layer starts at zero: it adds exact zeros to the backbone's logits
    assert torch.equal(out.logits[-1], net.backbone.head(net.backbone.forward_features(x)))
    from eenet.losses import MultiExitCE

    MultiExitCE(weights=[0.5, 1.0])(out, y, torch.tensor([0.5, 1.1]))["loss"].backward()
    for n, p in net.named_parameters():
        if ".confidence." in n:
            continue  # multi_ce does not train confidence heads
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    if mode == "trecx":  # the depthwise filters are shared, not copied
        assert net.final_head.tied[0] is net.exits[0].depthwise
        names = [n for n, _ in net.named_parameters()]
        assert not any(n.startswith("final_head.tied") for n in names)


def test_trecx_mitigation_needs_an_exit_no_wider_than_the_final_maps():
    from eenet.models.trecx import TRecXExit

    b = create_backbone("resnet8_tiny", num_classes=6, in_chans=3)
    # narrower exits read the first channels of the final maps (tests/test_trecx_paper.py)
    with pytest.raises(EENetError, match="set exit.width <= 64"):
        build_early_exit_network(b, functools.partial(TRecXExit, width=96), "explicit",
                                 stages=[0], input_size=(3, 16, 16), mitigation="trecx")


def test_folding_batchnorm_keeps_the_function_and_the_engine_exact():
    net = make_net(stages=(1, 4))
    net.exits[0] = ExitBlock(16, 5, (12, 12), preblock="pool", convs=2).eval()  # BN in a branch
    with torch.no_grad():
        for m in net.exits[0].modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    folded, pairs = fold_batchnorm(net)
    assert pairs == n_bn  # every BN in resnet20 and in the branch follows a convolution
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in original.items())  # not changed
    x = torch.randn(32, 1, 12, 12)
    with torch.no_grad():
        a, b = net(x), folded(x)
    # folding rounds the new weights to float32 and changes the order of operations: a
    # float32 computation of the same function, off by about the floor (measured <= 1.5x)
    tol = FLOOR_FACTOR * float32_floor(net, x)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(lb, la, rtol=0, atol=tol)
    # the engine on the folded network equals the folded network's static path + policy
    policy = create_policy("max_prob", median_thresholds(folded, x))
    with torch.no_grad():
        static = folded(x)
    assert torch.equal(DynamicEngine(folded, policy)(x).exit, policy.decide(static))
    plain, pairs_plain = fold_batchnorm(net.backbone)
    assert pairs_plain == sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.backbone.modules())
    with torch.no_grad():  # the backbone is the final exit: the same floor holds
        torch.testing.assert_close(plain(x), net.backbone(x), rtol=0, atol=tol)
