"""DynamicEngine.stream (samples that go on pooled across input batches) gives the engine's
own per-batch exits and predictions, in input order, and yields each batch in bounded time.

Pooling changes the batches the later steps run on, and a convolution rounds differently on
a batch of another size: a score within that rounding of its threshold could leave at one
exit batch by batch and at another pooled. The random tests therefore run a float64 copy of
the network (the engine keeps the network's dtype): its logits round 2**29 times finer than
float32's, and the policies score them in float32 (max_prob, entropy: ``logits.float()``) or
float64 (confidence; patience compares float64 argmaxes), so a pooled batch changes a score
only when a float64 value lies within about 1e-16 (relative) of a float32 rounding boundary
or of a threshold: about 2**-29 per score, against some 10**4 scores per run. The backend
test, in float32 as onnxruntime runs it, places the thresholds in gaps between the scores
wider than the rounding measured there (as tests/test_backends.py does).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eenet.cost import exit_cost_table
from eenet.errors import EENetError
from eenet.inference import DynamicEngine, create_engine
from eenet.policies import POLICIES, create_policy
from test_engine import FLOOR_FACTOR, float32_floor, make_net, thresholds_for  # tests/ on sys.path

def varied_heads(net, x: torch.Tensor):
    """``net`` with every classifier (exits and final) random around the mean of its input
    features on ``x``: the random BatchNorm statistics of :func:`test_engine.make_net` leave
    features dominated by one offset, so that every exit predicted one class for every input
    (and the patience policy's state was the same for every sample). Centred, each exit's
    prediction varies with the input, and two exits agree on some samples, not all."""
    heads = [e.classifier for e in net.exits] + [net.backbone.head.fc]
    feats = {}
    hooks = [h.register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, i[0]))
             for k, h in enumerate(heads)]
    with torch.no_grad():
        net(x)
        for h in hooks:
            h.remove()
        gen = torch.Generator().manual_seed(0)
        for k, h in enumerate(heads):
            f = feats[k]
            h.weight.copy_(torch.randn(h.weight.shape, generator=gen) / f.std(0).norm())
            h.bias.copy_(-h.weight @ f.mean(0))
    return net


CENTRE = torch.randn(256, 1, 12, 12, generator=torch.Generator().manual_seed(11))
NET = varied_heads(make_net(), CENTRE)
NET64 = copy.deepcopy(NET).double()
TABLE = exit_cost_table(NET)  # a cost table: the heads of idle exits are skipped
N_EARLY = NET.num_exits - 1


def float64_floor(x: torch.Tensor) -> float:
    """The float64 network's rounding on ``x``: the float32 network's measured floor
    (:func:`test_engine.float32_floor`) scaled by the ratio of the unit roundoffs,
    2**-53 / 2**-24: the same operations, each rounding 2**29 times finer."""
    return float32_floor(NET, x, NET64) * 2.0 ** -29


def assert_same_as_per_batch(got, ref, batches, tol):
    assert len(got) == len(ref) == len(batches)
    for a, b, x in zip(got, ref, batches):
        assert a.exit.shape == a.pred.shape == a.cost.shape == (x.shape[0],)
        assert torch.equal(a.exit, b.exit)
        assert torch.equal(a.pred, b.pred)
        assert torch.equal(a.cost, b.cost)
        if b.logits is not None:
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=tol)


@given(st.sampled_from(sorted(POLICIES)), st.lists(st.integers(0, 12), min_size=1, max_size=7),
       st.one_of(st.none(), st.integers(1, 30)), st.one_of(st.none(), st.integers(0, 4)),
       st.integers(0, 10_000), st.data())
@settings(max_examples=40, deadline=None)
def test_stream_equals_the_engine_batch_by_batch(name, sizes, min_batch, max_wait, seed, data):
    thresholds = thresholds_for(name, data, N_EARLY)
    # an idle exit now and then (inf: its head is skipped unless the policy is patience)
    thresholds = [math.inf if data.draw(st.integers(0, 4)) == 0 else t for t in thresholds]
    engine = DynamicEngine(NET64, create_policy(name, thresholds), TABLE, keep_logits=True)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(b, 1, 12, 12, generator=gen) for b in sizes]
    ref = [engine(x) for x in batches]
    got = list(engine.stream(batches, min_batch=min_batch, max_wait=max_wait))
    if max_wait == 0:  # no pooling across batches: the very sub-batches of the engine
        tol = 0.0
    else:
        x = torch.cat(batches)
        tol = FLOOR_FACTOR * float64_floor(x) if x.shape[0] else 0.0
    assert_same_as_per_batch(got, ref, batches, tol)
    assert all(o.logits.dtype == torch.float64 for o in got)


def between_scores(scores: torch.Tensor, q: float = 0.5, margin: float = 0.0) -> list[float]:
    """Per exit, a threshold midway between two neighbouring scores around quantile ``q``
    whose gap exceeds 2 x ``margin`` (a threshold on a sample's own score would decide it
    by rounding); inf where there is no such gap."""
    out = []
    for i in range(scores.shape[1]):
        s = torch.sort(scores[:, i]).values.tolist()
        start = int(q * (len(s) - 1))
        order = sorted(range(len(s) - 1), key=lambda k: abs(k - start))
        gaps = [k for k in order if s[k + 1] - s[k] > 2 * margin]
        out.append((s[gaps[0]] + s[gaps[0] + 1]) / 2 if gaps else math.inf)
    return out


def counting_net():
    """A float64 network whose stage after exit 0 records the rows of every call, and its
    cost table."""
    net = varied_heads(make_net(stages=(1, 4), seed=2), CENTRE)
    table = exit_cost_table(net)
    net = net.double()
    rows = []
    net.backbone.stages[2].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    return net, rows, table


class Feed:
    """The batches, counting how many the stream has read; ``on_end()`` is called when it
    asks for more after the last."""

    def __init__(self, batches, on_end=lambda: None):
        self.batches, self.read, self.on_end = batches, 0, on_end

    def __iter__(self):
        for x in self.batches:
            self.read += 1
            yield x
        self.on_end()


def test_pools_run_at_min_batch_and_flush_at_the_end():
    net, rows, table = counting_net()
    batches = list(torch.randn(96, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64).split(8))
    with torch.no_grad():
        scores = create_policy("max_prob").scores(net(torch.cat(batches)))
    policy = create_policy("max_prob", between_scores(scores, q=0.5))
    engine = DynamicEngine(net, policy, table)
    rows.clear()
    ref = [engine(x) for x in batches]
    gone_on = sum(int((o.exit > 0).sum()) for o in ref)
    assert 12 < gone_on < 84, "the test needs about half of the samples to go on"
    assert len(rows) == sum(bool((o.exit > 0).any()) for o in ref)  # batch by batch: every batch
    rows.clear()
    ends = []  # the runs from here on are the end-of-input flush
    got = list(engine.stream(Feed(batches, lambda: ends.append(len(rows))), min_batch=16,
                             max_wait=None))
    assert len(ends) == 1
    ended_at = ends[0]
    assert_same_as_per_batch(got, ref, batches, tol=0.0)
    assert sum(rows) == gone_on  # each sample that goes on runs the stage once
    assert all(r >= 16 for r in rows[:ended_at])  # a run before the end: a full pool
    assert len(rows[ended_at:]) <= 1  # at the end: what was left in the pool, once
    assert len(rows) <= gone_on // 16 + 1 < len(batches)


def test_batches_are_yielded_as_soon_as_their_samples_have_left():
    net, _, table = counting_net()
    batches = list(torch.randn(80, 1, 12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64).split(4))
    with torch.no_grad():
        scores = create_policy("max_prob").scores(net(torch.cat(batches)))
    policy = create_policy("max_prob", between_scores(scores, q=0.2))  # about 1 in 5 goes on
    engine = DynamicEngine(net, policy, table)
    ref = [engine(x) for x in batches]
    waits = [int((o.exit > 0).any()) for o in ref]
    assert 0 < sum(waits) < len(batches), "the test needs batches with and without stayers"

    def read_at_yield(**kw):
        feed = Feed(batches)
        read = []
        for k, out in enumerate(engine.stream(feed, **kw)):
            assert torch.equal(out.exit, ref[k].exit) and torch.equal(out.pred, ref[k].pred)
            read.append(feed.read)
        assert len(read) == len(batches)
        return read

    # everyone leaves at exit 0: each batch is yielded before the next is read
    everyone = DynamicEngine(net, create_policy("max_prob", [-math.inf] * 2), table)
    feed = Feed(batches)
    assert [feed.read for _ in everyone.stream(feed)] == list(range(1, len(batches) + 1))
    # max_wait 0: no pooling across batches, each yielded at once
    assert read_at_yield(min_batch=1000, max_wait=0) == list(range(1, len(batches) + 1))
    for w in (1, 3):  # batch k is yielded before batch k + w + 1 is read
        read = read_at_yield(min_batch=1000, max_wait=w)
        assert all(r <= k + 1 + w for k, r in enumerate(read)), (w, read)
        assert any(r > k + 1 for k, r in enumerate(read)), "pooling made some batch wait"
    # no limit and a pool that never fills: everything after the first batch with a stayer
    # waits for the end of the input (the latency streaming trades for throughput)
    first = waits.index(1)
    read = read_at_yield(min_batch=1000, max_wait=None)
    assert read[:first] == list(range(1, first + 1))
    assert all(r == len(batches) for r in read[first:])


def test_patience_state_and_logits_are_carried_through_the_pools():
    """Patience carries each sample's last prediction and run length from exit to exit: pooled,
    the state must follow its sample. Varied head weights, so that exits sometimes agree."""
    net = varied_heads(make_net(seed=4), CENTRE)
    net64 = copy.deepcopy(net).double()
    x = torch.randn(60, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    batches = list(x.split(6))
    # exit 0 never leaves (no earlier exit to agree with), exits 1, 2 when they agree with
    # the exit before them
    engine = DynamicEngine(net64, create_policy("patience", [2, 2, 2]), exit_cost_table(net),
                           keep_logits=True)
    ref = [engine(x) for x in batches]
    assert set(torch.cat([o.exit for o in ref]).tolist()) == {1, 2, 3}, "the test needs all"
    tol = FLOOR_FACTOR * float32_floor(net, torch.cat(batches), net64) * 2.0 ** -29  # see
    for min_batch in (5, 13, 60):  # float64_floor
        got = list(engine.stream(batches, min_batch=min_batch, max_wait=None))
        assert_same_as_per_batch(got, ref, batches, tol)


def test_empty_input_and_empty_batches():
    engine = DynamicEngine(NET, create_policy("max_prob", [0.5] * N_EARLY), TABLE,
                           keep_logits=True)
    assert list(engine.stream([])) == []
    assert list(engine.stream(iter(()))) == []
    out = list(engine.stream([torch.randn(0, 1, 12, 12), torch.randn(3, 1, 12, 12),
                              torch.randn(0, 1, 12, 12)]))
    assert [o.exit.shape[0] for o in out] == [0, 3, 0]
    assert out[0].logits.shape == (0, 5)


def one_line(exc_info):
    return "\n" not in str(exc_info.value)


def test_bad_input_is_one_line():
    engine = DynamicEngine(NET, create_policy("max_prob", [0.5] * N_EARLY), TABLE)
    good = torch.randn(4, 1, 12, 12)
    it = engine.stream([good, torch.randn(2, 3, 12, 12)])
    with pytest.raises(EENetError, match=r"expected \(batch, 1, H, W\)") as e:
        list(it)
    assert one_line(e)
    nan = torch.randn(2, 1, 12, 12)
    nan[1, 0, 0, 0] = math.nan
    for bad, msg in ((nan, "NaN or infinite"), (torch.zeros(2, 1, 12, 12, dtype=torch.uint8),
                                                 "uint8 images"), ([1, 2], "must be a torch.Tensor")):
        with pytest.raises(EENetError, match=msg) as e:
            list(engine.stream([good, bad]))
        assert one_line(e)
    for kw, msg in (({"min_batch": 0}, "min_batch must be"), ({"min_batch": 2.5}, "min_batch must"),
                    ({"max_wait": -1}, "max_wait must be"), ({"max_wait": True}, "max_wait must")):
        with pytest.raises(EENetError, match=msg) as e:
            engine.stream([good], **kw)  # at the call, before any batch is read
        assert one_line(e)
    with pytest.raises(EENetError, match="for one batch call the engine") as e:
        engine.stream(good)
    with pytest.raises(EENetError, match="iterable of .* got int") as e:
        engine.stream(3)
    assert one_line(e)
    net = make_net()
    engine = DynamicEngine(net, create_policy("max_prob", [0.5] * N_EARLY), TABLE)
    net.train()
    with pytest.raises(EENetError, match="eval mode only") as e:
        engine.stream([good])
    assert one_line(e)


def ort_scores(engine, x: torch.Tensor) -> torch.Tensor:
    """Every early exit's max_prob score through the backend's steps, heads all run."""
    with torch.inference_mode():
        live, out = (x,), []
        for step in engine.steps[:-1]:
            live = step.body(live)
            lg, _, live = step.head(live)
            out.append(torch.softmax(lg, 1).max(1).values)
    return torch.stack(out, 1)


def test_stream_through_the_onnxruntime_backend(tmp_path):
    built = create_engine(NET, create_policy("max_prob", [0.5] * N_EARLY), TABLE,
                          backend="onnxruntime", cache_dir=tmp_path)
    x = torch.randn(90, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    whole = ort_scores(built, x)
    # the rounding of onnxruntime's pieces over batch compositions, measured here: x one by
    # one and in batches of 7, against the whole batch; the margin is 4x that, plus one
    # float32 ulp of a probability (<= 1), 2**-23, for a difference not met on these batches
    parts = [torch.cat([ort_scores(built, c) for c in x.split(k)]) for k in (1, 7)]
    margin = 4 * max(float((p - whole).abs().max()) for p in parts) + 2.0 ** -23
    assert margin < 1e-4, margin  # the same function
    thresholds = between_scores(whole, q=0.4, margin=margin)
    assert not any(math.isinf(t) for t in thresholds)
    engine = type(built)(NET, create_policy("max_prob", thresholds), TABLE, built.steps,
                         "onnxruntime", 0.0, keep_logits=True)
    batches = list(x.split(9))
    ref = [engine(b) for b in batches]
    assert len(set(torch.cat([o.exit for o in ref]).tolist())) >= 3
    tol = FLOOR_FACTOR * float32_floor(NET, x)  # float32 logits of other batch compositions
    for min_batch, max_wait in ((None, 16), (4, None), (30, 2)):
        got = list(engine.stream(batches, min_batch=min_batch, max_wait=max_wait))
        assert_same_as_per_batch(got, ref, batches, tol)
