"""Inputs checked where they enter (the dynamic engine, the ONNX runner) and thresholds
with one meaning (``inf``: never leave here) for every policy, everywhere.

One small network (resnet20, exits after stages 1 and 4, digits-sized 1x8x8 input,
random weights and BatchNorm statistics) is exported once; the runner tests write
their own manifests beside its ONNX files.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from eenet.build import build_early_exit_network
from eenet.calibration import Calibrator, cache_exit_outputs
from eenet.calibration.cache import CachedExits
from eenet.cost import exit_cost_table
from eenet.errors import EENetError
from eenet.export import export_segments
from eenet.export import onnx as onnx_export
from eenet.export.onnx_runner import MANIFEST_VERSION, OnnxEarlyExitRunner, RunnerError
from eenet.inference import DynamicEngine
from eenet.models import ExitBlock, create_backbone
from eenet.policies import POLICIES, create_policy
from eenet.reporting.results import (ENTROPY_AS_NEGATIVE_FROM, FORMAT_VERSION, RunResults,
                                     read_policy)

INPUT = (1, 8, 8)
MEAN, STD = (0.3053,), (0.3760,)  # digits' normalisation (eenet/data/vision.py)


def make_net():
    torch.manual_seed(0)
    b = create_backbone("resnet20", num_classes=10, in_chans=1)
    net = build_early_exit_network(b, functools.partial(ExitBlock, preblock="plain"), "explicit",
                                   stages=[1, 4], input_size=INPUT)
    for m in net.modules():  # random BatchNorm statistics: eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


NET = make_net()
COST = exit_cost_table(NET)
N_EARLY = NET.num_exits - 1
DIGITS = load_digits().images[:64].astype(np.float32)[:, None]  # (64, 1, 8, 8), values 0..16
# normalised as trained, with the float32 operations of the runner's preprocess
X = torch.from_numpy((DIGITS / np.float32(16) - np.float32(MEAN[0])) / np.float32(STD[0]))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export_segments(NET, INPUT, out, create_policy("max_prob", 0.5), COST, mean=MEAN, std=STD,
                    input_range=(0, 1))
    return out


def manifest_with(folder, name, **changes):
    """A manifest beside the exported ONNX files, with some keys changed; returns its path."""
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    path = folder / name
    path.write_text(json.dumps(m))
    return path


def one_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def spread_thresholds(name="max_prob"):
    """Per-exit thresholds halfway between the two middle scores of X: the batch splits."""
    with torch.no_grad():
        srt = create_policy(name).scores(NET(X)).sort(0).values
    return ((srt[31] + srt[32]) / 2).tolist()


# ---- the dynamic engine ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("batch", [1, 8])
def test_engine_refuses_non_finite_samples(value, batch):
    x = X[:batch].clone()
    x[batch - 1, 0, 2, 3] = value
    engine = DynamicEngine(NET, create_policy("max_prob", 0.5), COST)
    with pytest.raises(EENetError) as err:
        engine(x)
    assert one_line(err) == (f"input holds NaN or infinite values in 1 of {batch} samples (the "
                             f"first: sample {batch - 1}); they are refused, not classified: "
                             f"drop or repair those samples")


def test_calibration_cache_refuses_non_finite_samples():
    x = X[:8].clone()
    x[5] = math.nan
    with pytest.raises(EENetError, match=r"NaN or infinite values in 1 of 8 samples"):
        cache_exit_outputs(NET, [(x, torch.zeros(8, dtype=torch.long))])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_engine_converts_floating_input_to_float32(dtype):
    engine = DynamicEngine(NET, create_policy("max_prob", spread_thresholds()), COST)
    got = engine(X.to(dtype))
    want = engine(X.to(dtype).float())  # float64 -> float32 is X itself: the values are float32
    assert len(set(want.exit.tolist())) == 3 and len(set(want.pred.tolist())) > 2, \
        "the test needs varied exits and classes"
    assert torch.equal(got.pred, want.pred) and torch.equal(got.exit, want.exit)
    assert torch.equal(got.cost, want.cost)
    if dtype == torch.float64:
        assert torch.equal(got.pred, engine(X).pred) and torch.equal(got.exit, engine(X).exit)


@pytest.mark.parametrize("dtype,hint", [
    (torch.uint8, "((x.float() / 255) - mean) / std"), (torch.int64, "pass a float32 tensor"),
    (torch.int32, "pass a float32 tensor"), (torch.bool, "pass a float32 tensor")])
def test_engine_refuses_integer_input(dtype, hint):
    engine = DynamicEngine(NET, create_policy("max_prob", 0.5), COST)
    with pytest.raises(EENetError) as err:
        engine(torch.from_numpy(DIGITS).to(dtype))
    msg = one_line(err)
    assert msg.startswith(f"input of dtype {dtype} is not accepted (floating point only")
    assert msg.endswith(hint)


@pytest.mark.parametrize("bad,message", [
    (X[0, 0], "input of shape (8, 8) does not fit this network: expected (batch, 1, 8, 8)"),
    (X[0], "input of shape (1, 8, 8) does not fit this network: expected (batch, 1, 8, 8)"),
    (X[:2].permute(0, 2, 3, 1).expand(2, 8, 8, 3),
     "input of shape (2, 8, 8, 3) does not fit this network: expected (batch, 1, 8, 8)"),
    (X[:2].numpy(), "input must be a torch.Tensor (B, C, H, W), got ndarray; for a numpy array "
                    "pass torch.from_numpy(x)"),
    (torch.zeros(2, *INPUT, device="meta"), "input is on meta but the network on cpu: move it "
                                            "first, x.to('cpu')")])
def test_engine_refuses_wrong_shapes_and_containers(bad, message):
    with pytest.raises(EENetError) as err:
        DynamicEngine(NET, create_policy("max_prob", 0.5), COST)(bad)
    assert one_line(err) == message


# ---- the ONNX runner --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_runner_refuses_non_finite_samples(exported, value):
    r = OnnxEarlyExitRunner(exported, threads=1)
    x = X.numpy().copy()
    x[7, 0, 0, 0] = value
    with pytest.raises(RunnerError) as err:
        r(x)
    assert one_line(err) == ("input holds NaN or infinite values in 1 of 64 samples (the first: "
                             "sample 7); they are refused, not classified: drop or repair those "
                             "samples")
    images = DIGITS / 16
    images[3, 0, 4, 4] = value
    with pytest.raises(RunnerError, match=r"^images holds NaN or infinite values in 1 of 64 "
                                          r"samples \(the first: sample 3\)"):
        r.preprocess(images)
    assert issubclass(RunnerError, ValueError)  # callers that caught ValueError still do


def test_runner_converts_floats_and_scales_uint8_images(exported):
    path = manifest_with(exported, "spread.json", policy={
        "name": "max_prob", "thresholds": spread_thresholds()})
    r = OnnxEarlyExitRunner(path, threads=1)
    x = X.numpy()
    pred, exits, cost = r(x)
    assert len(set(exits.tolist())) == 3 and len(set(pred.tolist())) > 2
    for other in (x.astype(np.float64), x.astype(np.float64).tolist()):
        p, e, c = r(other)
        np.testing.assert_array_equal(p, pred)
        np.testing.assert_array_equal(e, exits)
    half = x.astype(np.float16)
    for got, want in zip(r(half), r(half.astype(np.float32))):
        np.testing.assert_array_equal(got, want)
    # uint8 images 0..255 for a model trained on [0, 1]: scaled by 1/255, as documented
    u8 = np.round(DIGITS * (255 / 16)).astype(np.uint8)
    scaled = r.preprocess(u8)
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, r.preprocess(u8.astype(np.float32) / np.float32(255)))
    for got, want in zip(r(scaled), r(r.preprocess(u8.astype(np.float32) / np.float32(255)))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int32, np.bool_])
def test_runner_refuses_integer_input(exported, dtype):
    r = OnnxEarlyExitRunner(exported, threads=1)
    with pytest.raises(RunnerError) as err:
        r(DIGITS.astype(dtype))
    hint = ("pass runner.preprocess(images) (uint8 images 0..255 are scaled there)"
            if dtype == np.uint8 else "pass float32 values")
    assert one_line(err) == (f"input of dtype {np.dtype(dtype)} is not accepted "
                             f"(float16/32/64): {hint}")
    if dtype != np.uint8:
        with pytest.raises(RunnerError, match=f"images of dtype {np.dtype(dtype)} is not accepted "
                                              r"\(uint8 or float16/32/64\)"):
            r.preprocess(DIGITS.astype(dtype))


def test_runner_refuses_uint8_when_the_range_is_not_0_to_1(exported):
    for name, rng, shown in (("norange.json", None, "not recorded"),
                             ("mfcc.json", [0.0, 200.0], "[0.0, 200.0]")):
        r = OnnxEarlyExitRunner(manifest_with(exported, name, input_range=rng), threads=1)
        with pytest.raises(RunnerError) as err:
            r.preprocess(DIGITS.astype(np.uint8))
        assert one_line(err) == ("uint8 images are scaled by 1/255 only for a model trained on "
                                 f"[0, 1]; this export's input range is {shown}: pass float32 "
                                 "values in it")


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 1, 8, 9), (4, 3, 8, 8), (4, 8, 8, 1)])
def test_runner_refuses_wrong_shapes(exported, shape):
    r = OnnxEarlyExitRunner(exported, threads=1)
    with pytest.raises(RunnerError) as err:
        r(np.zeros(shape, dtype=np.float32))
    assert one_line(err) == (f"input of shape {shape} does not fit: expected (batch, 1, 8, 8) "
                             "(NCHW)")
    with pytest.raises(RunnerError, match=r"^images of shape .* does not fit"):
        r.preprocess(np.zeros(shape, dtype=np.float32))


def test_runner_refuses_values_outside_the_trained_range(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["input_range"] == [0.0, 1.0]
    r = OnnxEarlyExitRunner(exported, threads=1)
    with pytest.raises(RunnerError) as err:
        r.preprocess(DIGITS)  # sklearn's digits: 0..16
    assert one_line(err) == ("images hold values in [0, 16] but the model was trained on [0, 1] "
                             "(before normalisation): rescale them (e.g. sklearn's digits 0..16: "
                             "divide by 16)")
    np.testing.assert_array_equal(r.preprocess(DIGITS / np.float32(16)), X.numpy())
    # the tolerance: a share RANGE_TOLERANCE (1e-3) of the range's width, either side
    r.preprocess(np.full((1, *INPUT), 1 + 0.9e-3, dtype=np.float32))
    r.preprocess(np.full((1, *INPUT), -0.9e-3, dtype=np.float32))
    for v in (1 + 1.1e-3, -1.1e-3):
        with pytest.raises(RunnerError, match="but the model was trained on"):
            r.preprocess(np.full((1, *INPUT), v, dtype=np.float32))
    # no recorded range (input_range null): no range to check
    free = OnnxEarlyExitRunner(manifest_with(exported, "free.json", input_range=None), threads=1)
    free.preprocess(DIGITS)


def test_export_records_a_valid_input_range(tmp_path):
    for bad in ((1, 0), (0, math.inf), (0,), "ab"):
        with pytest.raises(EENetError, match="input_range must be"):
            export_segments(NET, INPUT, tmp_path, create_policy("max_prob", 0.5), COST,
                            check=False, input_range=bad)
    path = export_segments(NET, INPUT, tmp_path, create_policy("max_prob", 0.5), COST,
                           check=False)
    assert json.loads(path.read_text())["input_range"] is None


# ---- patience thresholds ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.5, 0, -1, 1.5, [2, 0.5], -math.inf, math.nan, "1.5"])
def test_patience_thresholds_are_whole_numbers_of_at_least_one(bad):
    with pytest.raises(EENetError) as err:
        create_policy("patience", bad)
    assert "is not a whole number of exits >= 1" in one_line(err)


@pytest.mark.parametrize("good", [2, 1, 2.0, "2", [1, 3], [math.inf, 2], "inf"])
def test_patience_thresholds_accepted(good):
    create_policy("patience", good)


@pytest.mark.parametrize("name,bad,accepted", [
    ("patience", 0.5, "a whole number of exits >= 1 or inf"),
    ("patience", "-inf", "a whole number of exits >= 1 or inf"),
    ("entropy", 0.5, "t < 0 (leave when -H > t), inf or -inf"),
    ("max_prob", 1.5, "0 < t < 1, inf or -inf")])
def test_runner_refuses_thresholds_out_of_range(exported, name, bad, accepted):
    path = manifest_with(exported, f"bad_{name}.json", policy={"name": name, "thresholds": [bad, 2]})
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(path, threads=1)
    assert one_line(err) == (f"{path}: manifest {name} threshold {float(bad):g} is out of "
                             f"range: accepted {accepted}")  # the manifest is named


def test_calibrated_patience_thresholds_are_valid():
    """The search's "always leave" for patience is k = 1, not -inf (which create_policy refuses)."""
    with torch.no_grad():
        out = NET(X)
    cached = CachedExits(out.logits, out.conf_logits, torch.from_numpy(load_digits().target[:64]))
    res = Calibrator(cached, "patience", COST).calibrate(budget=COST.fractions[0])
    assert res.chosen.exit_rates[0] == 1.0  # the budget forces every sample out at exit 0
    assert res.chosen.thresholds[0] == 1.0
    create_policy("patience", res.chosen.thresholds)
    for p in res.pareto + res.curve + [res.reference]:
        create_policy("patience", p.thresholds)


# ---- inf means "never leave here" for every policy, everywhere --------------------------------

@pytest.mark.parametrize("name", sorted(POLICIES))
def test_inf_at_every_exit_sends_every_sample_to_the_final_exit(name, exported):
    policy = create_policy(name, math.inf)
    final = NET.num_exits - 1
    with torch.no_grad():
        out = NET(X)
    assert policy.decide(out).tolist() == [final] * 64  # the static path + policy
    assert DynamicEngine(NET, policy, COST)(X).exit.tolist() == [final] * 64
    assert DynamicEngine(NET, policy, COST)(X[:1]).exit.tolist() == [final]
    cal = Calibrator(CachedExits(out.logits, out.conf_logits, torch.zeros(64, dtype=torch.long)),
                     name, COST)
    point = cal.point(cal.score_vector(["inf"] * N_EARLY))
    assert point.exit_rates == [0.0] * N_EARLY + [1.0]
    assert point.thresholds == [math.inf] * N_EARLY
    _, _, rates = cal.evaluate(cal.score_vector([math.inf] * N_EARLY).view(1, -1))
    assert rates[0].tolist() == [0.0] * N_EARLY + [1.0]
    path = manifest_with(exported, f"{name}_inf.json",
                         policy={"name": name, "thresholds": ["inf"] * N_EARLY})
    _, exits, _ = OnnxEarlyExitRunner(path, threads=1)(X.numpy())
    assert exits.tolist() == [final] * 64
    # and the policy's "always leave" sends every sample out at exit 0 everywhere, so the
    # assertions above are not met by a pipeline that sends everything to the final exit
    always = [policy.always_leave] * N_EARLY
    assert DynamicEngine(NET, create_policy(name, always), COST)(X).exit.tolist() == [0] * 64
    assert cal.point(cal.score_vector(always)).exit_rates[0] == 1.0
    path = manifest_with(exported, f"{name}_always.json",
                         policy={"name": name, "thresholds": [str(t) for t in always]})
    assert OnnxEarlyExitRunner(path, threads=1)(X.numpy())[1].tolist() == [0] * 64


def test_entropy_threshold_is_minus_the_entropy_a_sample_may_have():
    """t = -h lets out exactly the samples whose entropy H (nats) < h, at the first exit."""
    with torch.no_grad():
        logits = NET(X).logits[0]
    h = -(logits.double().softmax(1) * logits.double().log_softmax(1)).sum(1)  # float64
    # the engine scores in float32: samples within twice the measured float32 error of the
    # cut may go either way
    with torch.no_grad():
        h32 = -create_policy("entropy").scores(NET(X)).double()[:, 0]
    slack = 2 * float((h32 - h).abs().max())
    cut = float(h.median())
    expect = (h < cut - slack).tolist()
    maybe = ((h - cut).abs() <= slack).tolist()
    assert sum(maybe) <= 2, "the boundary is too crowded to test the direction"
    got = (DynamicEngine(NET, create_policy("entropy", [-cut, math.inf]), COST)(X).exit == 0)
    assert any(expect) and not all(expect)
    assert all(g == e or m for g, e, m in zip(got.tolist(), expect, maybe))
    with pytest.raises(EENetError) as err:
        create_policy("entropy", 0.5)  # the old "H < 0.5": out of range, not reinterpreted
    assert one_line(err).startswith("entropy threshold 0.5 is outside (-inf, 0): the entropy "
                                    "policy leaves when -H(p) > t")


# ---- old files with entropy thresholds ----------------------------------------------------------

def test_old_results_with_entropy_thresholds_are_refused():
    assert ENTROPY_AS_NEGATIVE_FROM == 2 <= FORMAT_VERSION
    for version in ({}, {"format_version": 1}):
        old = {**version, "policy": {"name": "entropy", "thresholds": [0.3, "inf"]}}
        for read in (lambda d: read_policy(d, "old.json"),
                     lambda d: RunResults.from_dict(d, "old.json")):
            with pytest.raises(EENetError) as err:
                read(old)
            v = version.get("format_version", 0)
            assert one_line(err) == (
                f"old.json holds entropy thresholds of results format {v} (leave when the "
                f"entropy H < t, inf: always leave), which this eenet reads as -H > t (inf: never "
                f"leave); re-run eenet-eval (and eenet-export) for this run")
        calibrated = {**version, "policy": {"name": "max_prob", "thresholds": [0.5, 0.5]},
                      "calibration": {"policy": "entropy"}}
        with pytest.raises(EENetError, match="holds entropy thresholds"):
            read_policy(calibrated, "old.json")
        # other policies' thresholds kept their meaning: read as before
        assert read_policy({**version, "policy": {"name": "max_prob", "thresholds": [0.5, "inf"]}},
                           "old.json") == ("max_prob", [0.5, "inf"], None)
    assert read_policy({"format_version": 2, "policy": {"name": "entropy", "thresholds": [-0.3]}},
                       "new.json") == ("entropy", [-0.3], None)
    with pytest.raises(EENetError, match="no policy with name and thresholds"):
        read_policy({"format_version": 2}, "new.json")


def test_old_manifest_with_entropy_thresholds_is_refused(exported):
    assert MANIFEST_VERSION == onnx_export.FORMAT_VERSION == 4
    old = manifest_with(exported, "old_entropy.json", format_version=1,
                        policy={"name": "entropy", "thresholds": [0.3, "inf"]})
    with pytest.raises(RunnerError) as err:
        OnnxEarlyExitRunner(old, threads=1)
    assert one_line(err) == (
        f"{old} has entropy thresholds of manifest format 1 (leave when the entropy H < t, inf: "
        f"always leave), which format 2 reads as -H > t (inf: never leave); re-run eenet-export "
        f"for this run")
    # a format-1 manifest of another policy is read as before
    OnnxEarlyExitRunner(manifest_with(exported, "old_max_prob.json", format_version=1), threads=1)
    with pytest.raises(RunnerError, match="written by a newer eenet"):
        OnnxEarlyExitRunner(manifest_with(exported, "newer.json", format_version=5), threads=1)
    with pytest.raises(RunnerError, match="is not an eenet-export manifest"):
        OnnxEarlyExitRunner(manifest_with(exported, "other.json", format="something"), threads=1)
