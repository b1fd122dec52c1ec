"""Engine backends (eenet.inference.backends) give eager's exits and predictions; tail latency;
the calibrator with measured latencies as the cost, against a brute-force oracle."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from eenet.build import build_early_exit_network
from eenet.calibration import Calibrator
from eenet.calibration.cache import CachedExits
from eenet.config import compose_config
from eenet.cost import exit_cost_table
from eenet.errors import EENetError
from eenet.inference import (TAIL_KEYS, LatencyCostTable, create_engine, latency_cost_table,
                             tail_latency)
from eenet.jobs.train import train
from eenet.models import ExitBlock, create_backbone
from eenet.policies import create_policy
from eenet.runs import load_run


def make_net(seed=0):
    torch.manual_seed(seed)
    b = create_backbone("resnet20", num_classes=5, in_chans=1)
    net = build_early_exit_network(b, functools.partial(ExitBlock, preblock="pool"), "explicit",
                                   stages=[0, 2, 5], input_size=(1, 12, 12))
    for m in net.modules():  # random BatchNorm statistics: eval mode differs from train mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


NET = make_net()
COST = exit_cost_table(NET)


def eager_scores(x):
    """Every early exit's max_prob score of the static path (float32)."""
    with torch.inference_mode():
        out = NET(x)
    return torch.stack([torch.softmax(lg, 1).max(1).values for lg in out.logits[:-1]], 1)


def thresholds_in_gaps(scores: torch.Tensor, gen: torch.Generator, margin: float) -> list[float]:
    """Per exit, a random threshold in a gap between sorted scores wider than 2 x margin (or inf),
    so a score moved by less than ``margin`` cannot cross it."""
    out = []
    for i in range(scores.shape[1]):
        s = torch.sort(scores[:, i]).values
        gaps = [(float(a + b) / 2) for a, b in zip(s[:-1], s[1:]) if float(b - a) > 2 * margin]
        choices = gaps + [math.inf]
        out.append(choices[int(torch.randint(len(choices), (1,), generator=gen))])
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    cache = tmp_path_factory.mktemp("engine_cache")
    policy = create_policy("max_prob", 0.5)
    return {b: create_engine(NET, policy, COST, backend=b, cache_dir=cache / b)
            for b in ("eager", "compiled", "onnxruntime")}


@pytest.mark.parametrize("backend", ["compiled", "onnxruntime"])
def test_backend_gives_eager_exits_and_predictions(engines, backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 12, 12, generator=gen)
    eager_logits = NET(x).logits
    with torch.inference_mode():  # the backend's steps on every exit, against eager's logits
        live, diffs = (x,), []
        for j, step in enumerate(engines[backend].steps):
            live = step.body(live)
            lg, _, live = step.head(live)
            diffs.append(float((torch.softmax(lg, 1) - torch.softmax(eager_logits[j], 1)).abs().max()))
    # margin: 4x the largest probability difference measured here (frozen graphs fold BatchNorm,
    # onnxruntime fuses operations: rounding differs from eager), so no score crosses a threshold
    margin = 4 * max(diffs) + 1e-7
    assert margin < 1e-3, diffs  # the backends compute the same function
    scores = eager_scores(x)
    for trial in range(6):
        thr = thresholds_in_gaps(scores, gen, margin)
        policy = create_policy("max_prob", thr)
        ref = create_engine(NET, policy, COST, backend="eager")
        built = engines[backend]  # the same traced / exported steps, this policy
        other = built.with_policy(policy, COST)  # onnxruntime's batch 1: its numpy walk
        for bs in (1, 3, 17, 64):
            for start in range(0, 64, bs):
                xb = x[start:start + bs]
                a, b = ref(xb), other(xb)
                assert torch.equal(a.exit, b.exit), (trial, bs, thr)
                assert torch.equal(a.pred, b.pred), (trial, bs, thr)
                assert torch.equal(a.cost, b.cost)


def test_compiled_is_built_once_per_cache_and_weights(tmp_path):
    policy = create_policy("max_prob", 0.5)
    first = create_engine(NET, policy, COST, backend="compiled", cache_dir=tmp_path)
    again = create_engine(NET, policy, COST, backend="compiled", cache_dir=tmp_path)
    assert again.steps is first.steps  # the traced steps are reused
    assert first.first_call_seconds is None
    first(torch.randn(2, 1, 12, 12))
    assert first.first_call_seconds is not None and first.first_call_seconds > 0


def test_unknown_backend_and_missing_cache_are_one_line():
    policy = create_policy("max_prob", 0.5)
    with pytest.raises(EENetError, match="unknown engine backend 'tensorrt'; accepted: eager"):
        create_engine(NET, policy, COST, backend="tensorrt")
    with pytest.raises(EENetError, match="needs cache_dir"):
        create_engine(NET, policy, COST, backend="onnxruntime")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    train(compose_config(["trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                          "logger=none", "dataset.datamodule.train_subset=300", "threads=1"],
                         output_dir=out))
    return out


def test_onnxruntime_predictions_identical_on_digits_test(digits_run):
    _, dm, net, cost = load_run(digits_run)
    x = torch.stack([dm.test_dataset[i][0] for i in range(len(dm.test_dataset))])
    with torch.inference_mode():
        scores = torch.stack([torch.softmax(lg, 1).max(1).values for lg in net(x).logits[:-1]], 1)
    # thresholds: per exit midway between the two scores around its median (about half leave at
    # each exit; a threshold equal to a sample's own score would flip on a one-ulp difference)
    s = torch.sort(scores, 0).values
    m = s.shape[0] // 2
    policy = create_policy("max_prob", ((s[m - 1] + s[m]) / 2).tolist())
    ref = create_engine(net, policy, cost, backend="eager")(x)
    got = create_engine(net, policy, cost, backend="onnxruntime", cache_dir=digits_run / "ort")(x)
    assert ref.exit.unique().numel() > 1  # several exits are used
    assert torch.equal(ref.pred, got.pred)
    assert torch.equal(ref.exit, got.exit)


def test_tail_latency_keys_and_order(engines):
    x = torch.randn(40, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    for backend, engine in engines.items():
        t = tail_latency(engine, x, warmup=3)
        assert set(TAIL_KEYS) <= set(t)
        assert t["backend"] == backend and t["samples"] == 40
        assert 0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] <= t["max_ms"]
        assert t["p50_ms"] <= t["max_ms"] and 0 < t["mean_ms"] <= t["max_ms"]


def test_latency_cost_table_shape(engines):
    table = latency_cost_table(engines["compiled"], (1, 12, 12), batch_size=1, repeats=5, warmup=1)
    assert len(table.ms) == NET.num_exits and len(table.head_ms) == NET.num_exits - 1
    assert table.backend == "compiled" and table.fractions[-1] == 1.0
    assert all(m > 0 for m in table.ms)


def brute_force(scores, correct, ms, head_ms, budget_ms, candidates):
    """Every combination of candidate thresholds: the most accurate one whose mean time per
    sample (exit times, idle heads not paid) is <= budget_ms; ties to the lower time."""
    b, n = scores.shape
    best = None
    for t in itertools.product(*candidates):
        total_time, right = 0.0, 0
        saved = [sum(head_ms[j] for j in range(min(i, n)) if math.isinf(t[j])) for i in range(n + 1)]
        for k in range(b):
            e = next((i for i in range(n) if scores[k, i] > t[i]), n)
            total_time += ms[e] - saved[e]
            right += int(correct[k, e])
        key = (right, -total_time)
        if total_time / b <= budget_ms + 1e-9 and (best is None or key > best[0]):
            best = (key, t)
    return best


def test_budget_ms_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    b, k = 60, 4
    logits = [torch.randn(b, k, generator=gen) * s for s in (1.0, 2.0, 4.0)]
    targets = torch.randint(k, (b,), generator=gen)
    cached = CachedExits(logits, [torch.zeros(b)] * 2 + [torch.full((b,), math.inf)], targets)
    table = LatencyCostTable(ms=[0.3, 0.7, 1.6], head_ms=[0.05, 0.08], skippable_heads=[True, True],
                             batch_size=1, backend="synthetic")
    cal = Calibrator(cached, "max_prob", table, grid=5)
    scores, correct = cal.scores, cal.correct
    cands = [c.tolist() for c in cal.candidates]
    for budget_ms in (0.35, 0.6, 0.9, 1.2):
        res = cal.calibrate(budget_ms=budget_ms)
        oracle = brute_force(scores, correct, table.ms, table.head_ms, budget_ms, cands)
        assert res.target["kind"] == "budget_ms"
        assert res.target["expected_ms"] <= budget_ms + 1e-9
        assert res.chosen.accuracy == pytest.approx(oracle[0][0] / b, abs=1e-12)
        assert res.target["expected_ms"] == pytest.approx(-oracle[0][1] / b, abs=1e-9)
        # the table's own expectation, given which exits are idle, is the calibrator's
        idle = [math.isinf(t) and t > 0 for t in res.chosen.thresholds]
        assert table.expected_ms(res.chosen.exit_rates, idle) == pytest.approx(
            res.target["expected_ms"], abs=1e-9)
    with pytest.raises(EENetError, match="budget_ms needs measured latencies"):
        Calibrator(cached, "max_prob", [0.2, 0.5, 1.0], grid=5).calibrate(budget_ms=0.5)


# ---- several live values (issue 19, item 3) ---------------------------------------------------

@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow),  # 5 s
                                  "unet", "trecx_concat", "trecx_trecx"])
def test_backends_carry_several_live_values(name, tmp_path):
    """A torchvision resnet18 cut inside a block (its shortcut crosses the cut), a U-Net skip
    across two cuts, T-RecX ``concat`` (exit 0's features carried to the final exit) and
    ``trecx``: each backend's steps give eager's exits and predictions."""
    from test_graph_export import build  # tests/ is on sys.path

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, size = build(name)
        cost = exit_cost_table(net, size)
        x = torch.randn(24, *size, generator=torch.Generator().manual_seed(1)) * 2
        pol = create_policy("max_prob")
        with torch.inference_mode():
            scores = pol.scores(net(x))
        built = {b: create_engine(net, create_policy("max_prob", [0.5] * (net.num_exits - 1)),
                                  cost, backend=b, cache_dir=tmp_path / b)
                 for b in ("compiled", "onnxruntime")}
        for backend, eng in built.items():
            with torch.inference_mode():  # every exit through the backend's steps
                live, got = (x,), []
                for step in eng.steps[:-1]:
                    live = step.body(live)
                    lg, _, live = step.head(live)
                    got.append(torch.softmax(lg, 1).max(1).values)
            margin = 4 * float((torch.stack(got, 1) - scores).abs().max()) + 1e-7
            gen = torch.Generator().manual_seed(2)
            used = set()
            for trial in range(4):
                policy = create_policy("max_prob", thresholds_in_gaps(scores, gen, margin))
                ref = create_engine(net, policy, cost)
                other = eng.with_policy(policy, cost)
                for bs in (1, 5, 24):
                    for start in range(0, 24, bs):
                        a, b = ref(x[start:start + bs]), other(x[start:start + bs])
                        assert torch.equal(a.exit, b.exit), (backend, trial, bs)
                        assert torch.equal(a.pred, b.pred), (backend, trial, bs)
                        used |= set(a.exit.tolist())
            assert len(used) >= 2, "the thresholds must send samples to several exits"
    finally:
        torch.set_num_threads(before)


def test_tail_latencies_interleave_engines_on_the_same_samples(engines):
    from eenet.inference.latency import tail_latencies

    x = torch.randn(30, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    calls = []

    class Counting:
        def __init__(self, name, engine):
            self.name, self.engine, self.backend = name, engine, engine.backend
            self.costs = engine.costs

        def __call__(self, xb):
            calls.append((self.name, float(xb.sum())))
            return self.engine(xb)

    both = {b: Counting(b, engines[b]) for b in ("eager", "onnxruntime")}
    out = tail_latencies(both, x, warmup=2, block=8)
    assert set(out) == set(both)
    for b, t in out.items():
        assert t["backend"] == b and t["samples"] == 30
        assert 0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] <= t["max_ms"]
    # blocks of 8 samples (the last of 6), each on both engines, the first engine alternating;
    # a warm-up of 2 samples before each engine's first block
    ids = [float(v.sum()) for v in x]
    expected = []
    for b, start in enumerate(range(0, 30, 8)):
        order = ["eager", "onnxruntime"] if b % 2 == 0 else ["onnxruntime", "eager"]
        for name in order:
            if b == 0:
                expected += [(name, i) for i in ids[:2]]
            expected += [(name, i) for i in ids[start:start + 8]]
    assert calls == expected


def test_a_damaged_or_foreign_onnx_cache_is_exported_again(tmp_path):
    """The cache is checked against the network before use: a damaged file, or another
    network's piece under a matching key, is replaced by a new export, never run."""
    policy = create_policy("max_prob", 0.5)
    cache = tmp_path / "ort"
    first = create_engine(NET, policy, COST, backend="onnxruntime", cache_dir=cache)
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    ref = first(x)
    other = make_net(seed=1)
    create_engine(other, policy, exit_cost_table(other), backend="onnxruntime",
                  cache_dir=tmp_path / "other")
    for damage in ("garbage", "foreign"):
        target = cache / "segment_1.onnx"
        if damage == "garbage":
            target.write_bytes(b"not an onnx file")
        else:
            target.write_bytes((tmp_path / "other" / "segment_1.onnx").read_bytes())
        before = target.read_bytes()
        again = create_engine(NET, policy, COST, backend="onnxruntime", cache_dir=cache)
        assert target.read_bytes() != before, damage  # exported again
        out = again(x)
        assert torch.equal(out.exit, ref.exit) and torch.equal(out.pred, ref.pred), damage


def test_onnxruntime_call_restores_torch_threads_even_on_a_refused_input(engines):
    """The onnxruntime backend runs PyTorch's bookkeeping on one thread during a call
    (BackendEngine._call); the caller's thread count is back afterwards, also when the call
    raises, and the fused pieces give the separate pieces' results."""
    engine = engines["onnxruntime"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(3))
        out = engine(x)
        assert torch.get_num_threads() == 2
        with pytest.raises(EENetError):
            engine(torch.full((2, 1, 12, 12), float("nan")))
        assert torch.get_num_threads() == 2
        with torch.inference_mode():  # fused step 0 against segment then head, on the same input
            step = engine.steps[0]
            fused_logits, _, _ = step.fused((x,))
            sep_logits, _, _ = step.head(step.body((x,)))
            eager = NET.walk()[0]
            eager_logits, _, _ = eager.head(eager.body((x,)))
        # the noise floor: how far onnxruntime's pieces lie from PyTorch on this input, plus
        # float32's resolution at the logits' scale
        floor = (sep_logits - eager_logits).abs().max() \
            + torch.finfo(torch.float32).eps * sep_logits.abs().max()
        assert (fused_logits - sep_logits).abs().max() <= 4 * floor
        assert out.pred.shape == (5,)
        seen = []  # the consumer of stream() runs with its own thread count between yields
        for got in engine.stream([x[:2], x[2:]], min_batch=4):
            seen.append(torch.get_num_threads())
            assert got.pred.shape[0] in (2, 3)
        assert seen == [2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend,single_threads,batch_threads",
                         [("compiled", 1, 2), ("eager", 2, 2)])
def test_single_sample_threads_per_backend(engines, backend, single_threads, batch_threads):
    """The compiled backend runs a batch of one on one PyTorch thread (BackendEngine
    ._one_thread), batches on the caller's threads; eager, the reference, keeps the
    caller's threads; the caller's count is back after every call."""
    from eenet.inference.backends import BackendEngine
    from eenet.models.early_exit import Step
    seen: list[int] = []

    def watched(fn):
        def run(live):
            seen.append(torch.get_num_threads())
            return fn(live)
        return run

    inner = engines[backend]
    steps = [Step(watched(s.body), watched(s.head), s.skippable,
                  None if s.fused is None else watched(s.fused)) for s in inner.steps]
    engine = BackendEngine(NET, create_policy("max_prob", math.inf), COST, steps, backend,
                           0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(4)
        for batch, want in ((1, single_threads), (3, batch_threads)):
            seen.clear()
            out = engine(torch.randn(batch, 1, 12, 12, generator=gen))
            assert out.pred.shape == (batch,)
            assert seen and set(seen) == {want}, (batch, seen)  # threshold inf: every step runs
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name,thresholds", [("max_prob", [0.30, math.inf, 0.41]),
                                             ("patience", [2, 2, 2]),
                                             ("entropy", [-1.58, -1.49, -1.33])])
def test_onnxruntime_single_sample_walk_equals_its_tensor_walk(engines, name, thresholds):
    """onnxruntime's batch of one walks numpy values (BackendEngine._run_one): the same
    sessions as the tensor walk, so the same exits, predictions, costs and logits, exactly,
    with an idle exit (inf) and a policy that carries a state (patience)."""
    from eenet.inference.backends import BackendEngine
    built = engines["onnxruntime"]
    policy = create_policy(name, thresholds)
    fast = built.with_policy(policy, COST)
    fast.keep_logits = True
    tensors = BackendEngine(NET, policy, COST, built.steps, "onnxruntime", 0.0, keep_logits=True)
    assert fast.skipped == tensors.skipped
    x = torch.randn(40, 1, 12, 12, generator=torch.Generator().manual_seed(6)) * 3
    exits = []
    for i in range(40):
        a, b = fast(x[i:i + 1]), tensors(x[i:i + 1])
        for field in ("pred", "exit", "cost", "logits"):
            va, vb = getattr(a, field), getattr(b, field)
            assert va.dtype == vb.dtype and torch.equal(va, vb), (name, i, field)
        exits.append(int(a.exit))
    # thresholds near the scores' medians on this input send samples to several exits (this
    # random network's exits never agree, so patience takes every sample to the final exit)
    assert len(set(exits)) >= (1 if name == "patience" else 2), exits
    strided = torch.randn(1, 1, 12, 24, generator=torch.Generator().manual_seed(7))[..., ::2]
    assert not strided.is_contiguous()  # a view, as a slice of a user's tensor can be
    a, b = fast(strided), tensors(strided.contiguous())
    assert torch.equal(a.exit, b.exit) and torch.equal(a.logits, b.logits)
