"""Per-exit temperature scaling and expected calibration error (eenet.calibration.temperature)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eenet.calibration import CachedExits, Calibrator
from eenet.calibration.temperature import (apply_temperatures, exit_calibration_errors, exit_reliability,
                                           expected_calibration_error, fit_temperature, fit_temperatures,
                                           reliability_bins, temperature_report)
from eenet.errors import EENetError
from eenet.policies import create_policy
from eenet.reporting.plots import plot_reliability


def sampled(t0: float, n: int, k: int = 10, seed: int = 0, scale: float = 2.0):
    """Logits ``t0 * true_logits`` with labels drawn from softmax(true_logits).

    The model softmax(z / T) is then exactly right at T = t0: the NLL fit should find t0.
    Returns (observed logits, labels, true logits).
    """
    g = torch.Generator().manual_seed(seed)
    true = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.multinomial(F.softmax(true, 1), 1, generator=g).view(-1)
    return t0 * true, y, true


def nll(z, y, t):
    return float(F.cross_entropy(z.double() / t, y))


def test_fit_recovers_a_known_temperature():
    """The fitted T is within a few standard errors of t0, and its spread matches theory.

    The standard error is not a constant picked by hand: for the NLL in beta = 1/T the
    Fisher information per sample is I = E_b[Var_{p_b}(z_b)] (the NLL's second derivative,
    see the module docstring), so the maximum-likelihood beta has sd 1/sqrt(n I) and, by
    the delta method, T = 1/beta has sd SE = t0^2 / sqrt(n I), computed here from the
    sample. Each fit must lie within 4 SE of t0 (a normal deviate beyond 4 sd has
    probability 6e-5), their mean within 4 SE / sqrt(R), and the measured sd of R = 20
    fits within [0.5, 1.6] x SE (the sd of a sample sd of 20 normals is about
    1/sqrt(2 * 19) = 16 % of it, so both ends are more than 3 of those away).
    """
    t0, n, repeats = 2.5, 2000, 20
    fits, ses = [], []
    for seed in range(repeats):
        z, y, true = sampled(t0, n, seed=seed)
        t, clamped = fit_temperature(z, y)
        assert not clamped
        p = F.softmax(true, 1)  # = softmax(beta0 z) at the true beta0 = 1 / t0
        var = (p * z ** 2).sum(1) - (p * z).sum(1) ** 2
        se = t0 ** 2 / math.sqrt(n * float(var.mean()))
        assert abs(t - t0) <= 4 * se, (seed, t, se)
        fits.append(t)
        ses.append(se)
    fits_t = torch.tensor(fits, dtype=torch.float64)
    se = sum(ses) / len(ses)
    assert abs(float(fits_t.mean()) - t0) <= 4 * se / math.sqrt(repeats)
    assert 0.5 * se <= float(fits_t.std()) <= 1.6 * se, (float(fits_t.std()), se)


@pytest.mark.parametrize("t0", [0.4, 1.0, 3.0])
def test_fit_is_the_nll_minimum(t0):
    """A 1 % step either way raises the NLL (it is convex in 1/T: one minimum)."""
    z, y, _ = sampled(t0, 1000, seed=1)
    t, clamped = fit_temperature(z, y)
    assert not clamped
    assert nll(z, y, t * 1.01) > nll(z, y, t) < nll(z, y, t / 1.01)


def test_a_minimum_outside_the_interval_is_clamped_and_flagged():
    """Every sample correct: the NLL keeps falling as T -> 0, so T stops at t_min."""
    y = torch.arange(6) % 3
    z = F.one_hot(y, 3).double() * 5.0
    assert fit_temperature(z, y, t_min=0.1, t_max=10) == (0.1, True)
    cached = CachedExits([z, z], [torch.zeros(6), torch.zeros(6)], y)
    fit = fit_temperatures(cached, t_min=0.1, t_max=10)
    assert fit.temperatures == [0.1, 0.1] and fit.at_bound == [True, True]
    assert all(a < b for a, b in zip(fit.nll_after, fit.nll_before))


def test_ece_against_a_hand_computed_case():
    # 15 bins of width 1/15: 0.95 -> bin (14/15, 1], 0.55 -> (8/15, 9/15], 0.65 -> (9/15, 10/15]
    # float64 throughout: the sums have a few ulps (1e-16) of rounding, far below abs=1e-12
    conf = torch.tensor([0.95, 0.95, 0.55, 0.65], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True])
    # ECE = 2/4 |1/2 - 0.95| + 1/4 |1 - 0.55| + 1/4 |1 - 0.65| = 0.225 + 0.1125 + 0.0875
    r = reliability_bins(conf, correct, 15)
    assert r["ece"] == pytest.approx(0.425, abs=1e-12)
    assert r["count"][14] == 2 and r["count"][8] == 1 and r["count"][9] == 1 and sum(r["count"]) == 4
    assert r["accuracy"][14] == 0.5 and r["confidence"][14] == pytest.approx(0.95)
    assert r["accuracy"][0] is None  # empty bin
    # one bin: |mean accuracy - mean confidence| = |0.75 - 0.775|
    assert reliability_bins(conf, correct, 1)["ece"] == pytest.approx(0.025, abs=1e-12)
    # the same case through logits: two classes, p = (c, 1 - c), target 0 when correct
    logits = torch.stack([conf.log(), (1 - conf).log()], 1)
    targets = (~correct).long()
    assert expected_calibration_error(logits, targets) == pytest.approx(0.425, abs=1e-12)


def test_ece_bins_are_closed_on_the_right():
    r = reliability_bins(torch.tensor([0.6, 0.6 + 1e-6, 1.0], dtype=torch.float64),
                         torch.tensor([True, True, True]), 15)
    assert r["count"][8] == 1 and r["count"][9] == 1 and r["count"][14] == 1  # 0.6 = 9/15 in bin 9


@pytest.mark.parametrize("t0", [0.5, 2.5])
def test_scaling_lowers_ece_on_the_fitting_data(t0):
    """On a model miscalibrated by a temperature (under- and over-confident), the NLL fit
    lowers the ECE of the data it was fitted on. This is not a theorem for every model:
    on the MNIST model of experiments/runs/mnist_budget/ee the final exit's val ECE went
    from 0.149 % to 0.157 % at its NLL-optimal T = 1.016."""
    z, y, _ = sampled(t0, 3000, seed=2)
    cached = CachedExits([z, z / t0], [torch.zeros(len(y))] * 2, y)
    fit = fit_temperatures(cached)
    scaled = apply_temperatures(cached, fit.temperatures)
    before, after = exit_calibration_errors(cached), exit_calibration_errors(scaled)
    assert after[0] < before[0]
    # the second exit holds the same logits divided by t0 (calibrated as they are): its fit
    # is the first one's divided by t0, and after scaling both exits hold the same logits
    assert fit.temperatures[0] == pytest.approx(t0 * fit.temperatures[1], rel=1e-6)
    assert after[1] == pytest.approx(after[0], rel=1e-6)


def cached_three_exits(seed=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (300,), generator=g)
    logits = [torch.randn(300, 5, generator=g) * s for s in (1.0, 2.0, 4.0)]
    for lg in logits:
        lg[torch.arange(300), y] += 1.5
    conf = [torch.randn(300, generator=g) for _ in range(3)]
    return CachedExits(logits, conf, y)


def test_t_equal_one_is_the_identity_and_argmax_never_changes():
    cached = cached_three_exits()
    same = apply_temperatures(cached, [1.0, 1.0, 1.0])
    for a, b in zip(same.logits, cached.logits):
        assert torch.equal(a, b)
    assert torch.equal(same.correct, cached.correct)
    for policy in ("max_prob", "entropy", "confidence"):
        p = create_policy(policy, math.inf)  # any valid threshold: scores do not depend on it
        assert torch.equal(p.scores(same.outputs), p.scores(cached.outputs))
    temps = [0.3, 3.0, 7.0]
    scaled = apply_temperatures(cached, temps)
    assert torch.equal(scaled.correct, cached.correct)
    for a, b in zip(scaled.logits, cached.logits):
        assert torch.equal(a.argmax(1), b.argmax(1))
    assert not torch.equal(scaled.logits[0], cached.logits[0])  # the input is not modified
    # the calibrator scores the scaled logits: max softmax of z / T for each early exit
    cal = Calibrator(scaled, "max_prob", [0.3, 0.6, 1.0])
    want = torch.stack([F.softmax(cached.logits[i] / temps[i], 1).amax(1) for i in range(2)], 1)
    assert torch.allclose(cal.scores, want, rtol=0, atol=1e-6)  # float32 softmax, same formula
    # the confidence head's scores do not depend on the temperatures
    c = create_policy("confidence", math.inf)
    assert torch.equal(c.scores(scaled.outputs), c.scores(cached.outputs))


def test_report_and_diagram(tmp_path):
    cached = cached_three_exits()
    fit = fit_temperatures(cached)
    rep = temperature_report(fit, cached)
    assert rep["ece_bins"] == 15 and rep["samples"] == 300
    assert rep["ece_before"] == exit_calibration_errors(cached)
    assert rep["ece_after"] == exit_calibration_errors(apply_temperatures(cached, fit.temperatures))
    assert rep["ece_sum_after"] == pytest.approx(sum(rep["ece_after"]))
    assert rep["fit"]["temperatures"] == fit.temperatures
    scaled = apply_temperatures(cached, fit.temperatures)
    diagrams = {"before": [exit_reliability(lg, cached.targets) for lg in cached.logits],
                "after": [exit_reliability(lg, scaled.targets) for lg in scaled.logits]}
    assert [d["ece"] for d in diagrams["after"]] == pytest.approx(rep["ece_after"])
    path = plot_reliability(tmp_path / "reliability.png", diagrams, ["exit 0", "exit 1", "final"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("call, message", [
    (lambda c: apply_temperatures(c, [1.0, 0.0, 1.0]), "temperature of exit 1 must be a finite number > 0"),
    (lambda c: apply_temperatures(c, [1.0, -2.0, 1.0]), "temperature of exit 1 must be a finite number > 0"),
    (lambda c: apply_temperatures(c, [1.0, 1.0, math.nan]), "temperature of exit 2 must be a finite"),
    (lambda c: apply_temperatures(c, [1.0, 1.0, math.inf]), "temperature of exit 2 must be a finite"),
    (lambda c: apply_temperatures(c, [1.0, "x", 1.0]), "temperatures must be a list of numbers"),
    (lambda c: apply_temperatures(c, [1.0, 1.0]), "2 temperatures given for 3 exits"),
    (lambda c: fit_temperatures(CachedExits(c.logits, c.conf_logits, None)), "needs labelled samples"),
    (lambda c: fit_temperatures(CachedExits(c.logits, c.conf_logits, torch.full_like(c.targets, -1))),
     "classes in 0..4, got targets in -1..-1"),
    (lambda c: fit_temperatures(CachedExits(c.logits, c.conf_logits, c.targets[:10])),
     "one target per sample"),
    (lambda c: fit_temperatures(CachedExits(c.logits, c.conf_logits, c.targets.float())),
     "integer class indices"),
    (lambda c: fit_temperatures(c, t_min=2.0, t_max=1.0), "0 < t_min < t_max"),
    (lambda c: exit_calibration_errors(c, bins=0), "ECE bins must be an integer >= 1"),
    (lambda c: temperature_report(fit_temperatures(c), CachedExits(c.logits[:2], c.conf_logits[:2],
                                                                    c.targets)),
     "3 temperatures given for 2 exits"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(EENetError) as info:
        call(cached_three_exits())
    text = str(info.value)
    assert message in text and "\n" not in text
