"""Losses against direct, naive implementations: values, gradients, saturated confidences."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eenet.errors import EENetError
from eenet.losses import (EENetLoss, ExitDistillation, MultiExitCE, SumLoss, TwoStageLoss,
                          create_loss, mixture_costs, mixture_log_probs)
from eenet.models import ExitOutputs


def naive_eenet(logits, conf_logits, y, costs, lam, version):
    """EENets' recursion in probability space, one sample at a time (Demir & Akbas)."""
    n = len(logits) - 1
    b = y.shape[0]
    nll = [torch.zeros((), dtype=logits[0].dtype) for _ in range(n + 1)]
    cost = [torch.zeros((), dtype=logits[0].dtype) for _ in range(n + 1)]
    for s in range(b):
        P = torch.softmax(logits[n][s], 0)
        C = costs[n]
        nll[n] = nll[n] - torch.log(P[y[s]]) / b
        cost[n] = cost[n] + C / b
        for i in range(n - 1, -1, -1):
            h = torch.sigmoid(conf_logits[i][s])
            P = h * torch.softmax(logits[i][s], 0) + (1 - h) * P
            C = h * costs[i] + (1 - h) * C
            nll[i] = nll[i] - torch.log(P[y[s]]) / b
            cost[i] = cost[i] + C / b
    if version == 1:
        return nll[0] + lam * cost[0]
    return sum(nll[i] + lam * cost[i] for i in range(n + 1))


def random_outputs(n_exits=3, b=5, k=4, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = [(scale * torch.randn(b, k, generator=g, dtype=dtype)).requires_grad_()
              for _ in range(n_exits)]
    conf = [(scale * torch.randn(b, generator=g, dtype=dtype)).requires_grad_()
            for _ in range(n_exits - 1)]
    conf.append(torch.full((b,), float("inf"), dtype=dtype))
    y = torch.randint(0, k, (b,), generator=g)
    costs = torch.linspace(0.1, 1.05, n_exits, dtype=dtype)
    return logits, conf, y, costs


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("n_exits", [1, 2, 4])
def test_eenet_loss_equals_naive_values_and_gradients(version, lam, n_exits):
    logits, conf, y, costs = random_outputs(n_exits, seed=version * 10 + n_exits)
    got = EENetLoss(version, lam)(ExitOutputs(logits, conf), y, costs)["loss"]
    leaves = logits + conf[:-1]
    g_got = torch.autograd.grad(got, leaves)
    ref = naive_eenet(logits, conf, y, costs, lam, version)
    g_ref = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("version", [1, 2])
def test_eenet_loss_is_finite_at_confidences_exactly_zero_and_one(version):
    logits, conf, y, costs = random_outputs(3, dtype=torch.float32)
    with torch.no_grad():
        conf[0].copy_(torch.tensor([1e4, -1e4, 1e4, -1e4, 50.0]))  # sigmoid -> exactly 1 or 0
        conf[1].copy_(torch.tensor([-1e4, 1e4, 200.0, -200.0, 0.0]))
    h = [torch.sigmoid(z) for z in conf[:2]]
    assert (h[0][:4] == torch.tensor([1.0, 0.0, 1.0, 0.0])).all()
    assert (h[1][:4] == torch.tensor([0.0, 1.0, 1.0, 0.0])).all()
    loss = EENetLoss(version, 1.0)(ExitOutputs(logits, conf), y, costs)["loss"]
    grads = torch.autograd.grad(loss, logits + conf[:2])
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)
    # where h_0 == 1 exactly the mixture P_0 is p_0 alone: compare with the limit
    ref = naive_eenet([lg.double() for lg in logits], [z.double() for z in conf], y,
                      costs.double(), 1.0, version)
    # a float32 loss of a few tens of roundings (log-softmax and logaddexp of <= 4 terms per
    # exit, means over 5 samples, sums over 3 exits; all terms positive, no cancellation), each
    # <= 2**-24 relative: 64 units of roundoff; measured 0.2-0.4
    torch.testing.assert_close(loss.double(), ref, rtol=2 ** -18, atol=0)


@given(st.integers(1, 5), st.integers(1, 6), st.integers(2, 7), st.integers(0, 10_000),
       st.floats(0.1, 30.0))
@settings(max_examples=60, deadline=None)
def test_mixtures_are_distributions_and_costs_are_bounded(n_exits, b, k, seed, scale):
    logits, conf, _, costs = random_outputs(n_exits, b, k, seed, torch.float32, scale)
    for lp, lp64 in zip(mixture_log_probs(logits, conf), float64_log_probs(logits, conf)):
        torch.testing.assert_close(torch.logsumexp(lp, 1), torch.zeros(b), rtol=0,
                                   atol=logsumexp_tolerance(lp, lp64, n_exits))
    # C_i = h c_i + (1 - h) C_{i+1}: a convex combination, three roundings (<= 2**-24 of the
    # largest cost each) and 1 - h per exit: within 4 units per exit of [min c, max c]
    slack = 4 * n_exits * 2 ** -24 * float(costs.max())
    for c in mixture_costs(conf, costs):
        assert (c >= costs.min() - slack).all() and (c <= costs.max() + slack).all()


def float64_log_probs(logits, conf):
    """The mixtures' log-probabilities of the same (float32) outputs, computed in float64."""
    with torch.no_grad():
        return mixture_log_probs([lg.double() for lg in logits], [z.double() for z in conf])


def logsumexp_tolerance(lp, lp64, n_exits) -> float:
    """How far from 0 logsumexp of a float32 distribution's log-probabilities ``lp`` may be.

    The exact log-probabilities sum to 1; logsumexp is 1-Lipschitz in the max norm, so the
    float32 ones are off by at most their largest error against float64, plus logsumexp's
    own float32 rounding: the shift by the maximum m (u |m|), the exponentials and their
    sum of k terms (k u), the log (u), u = 2**-24. Measured: at most 0.2 of this (300 draws).
    Two checks keep the reference honest: the float64 mixture sums to 1 within the same
    rounding in float64, and the float32 error stays at rounding level, within 4 (n + k) u
    (1 + max |lp|) for n exits of k classes (one log-softmax and one logaddexp per exit;
    measured at most 0.34 of (n + k) u (1 + max |lp|) over 600 draws, half saturated).
    """
    k, top = lp.shape[1], float(lp64.abs().max())
    assert float(torch.logsumexp(lp64, 1).abs().max()) <= (k + 3 + top) * 2 ** -53
    err = float((lp.detach().double() - lp64).abs().max())
    assert err <= 4 * (n_exits + k) * 2 ** -24 * (1 + top), err
    return err + (k + 3 + top) * 2 ** -24


def test_eenet_loss_rejects_bad_settings():
    with pytest.raises(EENetError, match="lambda_coef must be >= 0"):
        EENetLoss(2, -0.1)
    with pytest.raises(EENetError, match="version must be 1 or 2"):
        EENetLoss(3, 1.0)
    with pytest.raises(EENetError, match="accepted: distill, eenet_v1, eenet_v2, multi_ce"):
        create_loss("eenet_v3")


def test_multi_ce_equals_weighted_sum_of_cross_entropies():
    logits, conf, y, costs = random_outputs(3)
    w = [0.3, 0.6, 1.0]
    got = MultiExitCE(weights=w)(ExitOutputs(logits, conf), y, costs)["loss"]
    ref = 0
    for wi, lg in zip(w, logits):
        ref = ref + wi * torch.stack([-torch.log_softmax(lg[s], 0)[y[s]]
                                      for s in range(len(y))]).mean()
    torch.testing.assert_close(got, ref)


def test_sdn_ramp_weights():
    loss = MultiExitCE(weights="cost", ramp_epochs=4, ramp_start=0.01)
    costs = torch.tensor([0.2, 0.6, 1.03])
    loss.set_epoch(0)
    assert loss.exit_weights(3, costs) == pytest.approx([0.01, 0.01, 1.0])
    loss.set_epoch(2)
    assert loss.exit_weights(3, costs) == pytest.approx([0.105, 0.305, 1.0])
    loss.set_epoch(10)
    assert loss.exit_weights(3, costs) == pytest.approx([0.2, 0.6, 1.0])
    with pytest.raises(EENetError, match="2 weights for 3 exits"):
        MultiExitCE(weights=[1, 1]).exit_weights(3, costs)


def test_two_stage_switches_after_k_epochs():
    logits, conf, y, costs = random_outputs(3)
    out = ExitOutputs(logits, conf)
    first, second = MultiExitCE(), EENetLoss(2, 1.0)
    loss = TwoStageLoss(first, second, first_epochs=2)
    for epoch, expected in [(0, first), (1, first), (2, second), (5, second)]:
        loss.set_epoch(epoch)
        torch.testing.assert_close(loss(out, y, costs)["loss"], expected(out, y, costs)["loss"])
    loss.set_epoch(0)
    assert loss.uses_confidence is False
    loss.set_epoch(3)
    assert loss.uses_confidence is True


@given(st.integers(2, 5), st.integers(1, 8), st.integers(0, 10_000),
       st.lists(st.sampled_from([-1e4, -80.0, -20.0, 0.0, 20.0, 80.0, 1e4]), min_size=4,
                max_size=4), st.sampled_from([1, 2]), st.floats(0.0, 4.0))
@settings(max_examples=80, deadline=None)
def test_losses_and_gradients_stay_finite_at_saturated_confidences(n_exits, b, seed, zs, version,
                                                                    lam):
    """Confidence logits that make h exactly 0 or 1 in float32 never give inf or NaN."""
    logits, conf, y, costs = random_outputs(n_exits, b, 4, seed, torch.float32, scale=5.0)
    with torch.no_grad():
        for i in range(n_exits - 1):
            conf[i].copy_(torch.tensor([zs[(i + j) % 4] for j in range(b)]))
    loss = EENetLoss(version, lam)(ExitOutputs(logits, conf), y, costs)["loss"]
    grads = torch.autograd.grad(loss, logits + conf[:-1])
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)
    for lp, lp64 in zip(mixture_log_probs(logits, conf), float64_log_probs(logits, conf)):
        assert torch.isfinite(lp).all()
        torch.testing.assert_close(torch.logsumexp(lp, 1), torch.zeros(b), rtol=0,
                                   atol=logsumexp_tolerance(lp, lp64, n_exits))


def test_validation_reports_the_final_objective_at_every_epoch():
    """Model selection compares val losses across epochs: schedules must not change their scale."""
    logits, conf, y, costs = random_outputs(3)
    out = ExitOutputs(logits, conf)
    second = EENetLoss(2, 0.5)
    two = TwoStageLoss(MultiExitCE(), second, first_epochs=2)
    for epoch in (0, 1, 5):
        two.set_epoch(epoch)
        torch.testing.assert_close(two.for_validation()(out, y, costs)["loss"],
                                   second(out, y, costs)["loss"])
    sdn = MultiExitCE(weights="cost", ramp_epochs=4)
    final = MultiExitCE(weights="cost")
    for epoch in (0, 2, 9):
        sdn.set_epoch(epoch)
        torch.testing.assert_close(sdn.for_validation()(out, y, costs)["loss"],
                                   final(out, y, costs)["loss"])
    sdn.set_epoch(0)
    assert not torch.allclose(sdn(out, y, costs)["loss"], final(out, y, costs)["loss"])


def test_sum_loss_adds_weighted_terms_and_keeps_low_confidence_branches_learning():
    logits, conf, y, costs = random_outputs(3)
    with torch.no_grad():
        conf[0].fill_(-30.0)  # exit 0 almost never exits: the mixture ignores its classifier
    out = ExitOutputs(logits, conf)
    eenet, ce = EENetLoss(2, 0.5), MultiExitCE()
    loss = SumLoss({"eenet": eenet, "ce": ce}, weights={"ce": 0.3})
    got = loss(out, y, costs)
    torch.testing.assert_close(got["loss"],
                               eenet(out, y, costs)["loss"] + 0.3 * ce(out, y, costs)["loss"])
    torch.testing.assert_close(got["cost"], eenet(out, y, costs)["cost"])
    assert loss.uses_confidence and loss.weights == {"eenet": 1.0, "ce": 0.3}
    g_mix = torch.autograd.grad(eenet(out, y, costs)["loss"], logits[0])[0]
    g_sum = torch.autograd.grad(got["loss"], logits[0])[0]
    assert g_mix.abs().max() < 1e-9 < g_sum.abs().max()


def test_sum_loss_validation_schedules_and_bad_settings():
    logits, conf, y, costs = random_outputs(3)
    out = ExitOutputs(logits, conf)
    ramped = MultiExitCE(weights="cost", ramp_epochs=4)
    loss = SumLoss({"eenet": EENetLoss(2, 1.0), "sdn": ramped})
    loss.set_epoch(1)
    assert ramped.epoch == 1
    ref = (EENetLoss(2, 1.0)(out, y, costs)["loss"]
           + MultiExitCE(weights="cost")(out, y, costs)["loss"])
    torch.testing.assert_close(loss.for_validation()(out, y, costs)["loss"], ref)
    assert not torch.allclose(loss(out, y, costs)["loss"], ref)
    plain = SumLoss({"ce": MultiExitCE()})
    assert plain.for_validation() is plain and plain.uses_confidence is False
    with pytest.raises(EENetError, match="at least one term"):
        SumLoss({})
    with pytest.raises(EENetError, match="unknown terms"):
        SumLoss({"ce": MultiExitCE()}, weights={"eenet": 1.0})
    with pytest.raises(EENetError, match=">= 0"):
        SumLoss({"ce": MultiExitCE()}, weights={"ce": -1.0})
    with pytest.raises(EENetError, match="2 weights for 3 exits"):
        SumLoss({"ce": MultiExitCE(weights=[1, 1])}).check(3)


def test_eenet_v2_ce_config_builds_the_sum_with_the_lambda_from_the_command_line():
    from hydra.utils import instantiate

    from eenet.config import compose_config
    cfg = compose_config(["loss=eenet_v2_ce", "loss.terms.eenet.lambda_coef=0.25"])
    loss = instantiate(cfg.loss)
    assert isinstance(loss, SumLoss) and set(loss.terms) == {"eenet", "ce"}
    assert loss.terms["eenet"].version == 2 and loss.terms["eenet"].lambda_coef == 0.25
    assert isinstance(loss.terms["ce"], MultiExitCE) and loss.weights == {"eenet": 1.0, "ce": 1.0}


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_distillation_equals_naive_softened_kl_and_leaves_the_teacher_alone(t):
    logits, conf, y, costs = random_outputs(3, b=6, k=5, seed=3)
    out = ExitOutputs(logits, conf)
    loss = ExitDistillation(temperature=t, weights=[0.5, 2.0])
    got = loss(out, y, costs)["loss"]
    want = torch.zeros((), dtype=torch.float64)
    for w, z in zip([0.5, 2.0], logits[:-1]):
        for s in range(6):  # KL(teacher || student) per sample, by its definition
            p = torch.softmax(logits[-1][s].detach() / t, 0)
            q = torch.softmax(z[s] / t, 0)
            want = want + w * t * t * (p * (p.log() - q.log())).sum() / 6
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, logits, allow_unused=True)
    assert grads[-1] is None  # the final exit is the teacher: no gradient into it
    assert all(g.abs().max() > 0 for g in grads[:-1])
    # an early exit that already equals the teacher contributes nothing
    same = ExitOutputs([logits[-1].detach().clone(), logits[-1]], conf[1:])
    assert ExitDistillation(t)(same, y, costs)["loss"].abs() < 1e-12


def test_distillation_rejects_bad_settings():
    with pytest.raises(EENetError, match="temperature must be > 0"):
        ExitDistillation(temperature=0)
    with pytest.raises(EENetError, match=">= 0"):
        ExitDistillation(weights=[1.0, -1.0])
    with pytest.raises(EENetError, match="2 weights for 3 early exits"):
        ExitDistillation(weights=[1.0, 1.0]).check(4)
    with pytest.raises(EENetError, match="at least one early exit"):
        ExitDistillation().check(1)
    assert isinstance(create_loss("distill", temperature=2.0), ExitDistillation)


def test_eenet_v2_kd_config_adds_distillation_to_eenet_v2_ce():
    from hydra.utils import instantiate

    from eenet.config import compose_config
    cfg = compose_config(["loss=eenet_v2_kd", "loss.terms.eenet.lambda_coef=0.5",
                          "loss.terms.kd.temperature=3"])
    loss = instantiate(cfg.loss)
    assert isinstance(loss, SumLoss) and set(loss.terms) == {"eenet", "ce", "kd"}
    assert loss.terms["eenet"].lambda_coef == 0.5 and loss.terms["kd"].temperature == 3.0
    logits, conf, y, costs = random_outputs(3)
    out = ExitOutputs(logits, conf)
    parts = [EENetLoss(2, 0.5)(out, y, costs)["loss"], MultiExitCE()(out, y, costs)["loss"],
             ExitDistillation(3.0)(out, y, costs)["loss"]]
    torch.testing.assert_close(loss(out, y, costs)["loss"], sum(parts))
