"""Exit policies against a per-sample loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eenet.errors import EENetError
from eenet.models import ExitOutputs
from eenet.policies import POLICIES, create_policy, first_exit


def outputs(n_exits, b, k, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = [scale * torch.randn(b, k, generator=g) for _ in range(n_exits)]
    # few classes make agreement between exits (patience) common enough to test
    conf = [scale * torch.randn(b, generator=g) for _ in range(n_exits - 1)]
    conf.append(torch.full((b,), math.inf))
    return ExitOutputs(logits, conf)


def naive_exit(name, out, s, thresholds):
    """Which exit sample s leaves at, by the policies' definitions, one exit at a time."""
    n = len(out.logits) - 1
    run, prev = 0, None
    for i in range(n):
        p = torch.softmax(out.logits[i][s].double(), 0)
        t = thresholds[i]
        if name == "confidence":
            leave = torch.sigmoid(out.conf_logits[i][s]).item() > t
        elif name == "max_prob":
            leave = p.max().item() > t
        elif name == "entropy":  # BranchyNet's H < h, as -H > t with t = -h
            leave = (p * p.log()).sum().item() > t
        else:
            pred = int(p.argmax())
            run = run + 1 if pred == prev else 1
            prev = pred
            leave = run >= t
        if leave:
            return i
    return n


RANGES = {"confidence": (0.05, 0.95), "max_prob": (0.2, 0.99), "entropy": (-1.2, -0.05),
          "patience": (1, 3)}


@given(st.sampled_from(sorted(POLICIES)), st.integers(1, 5), st.integers(1, 12),
       st.integers(0, 100_000), st.data())
@settings(max_examples=80, deadline=None)
def test_policy_decisions_equal_the_per_sample_definition(name, n_exits, b, seed, data):
    out = outputs(n_exits, b, 3, seed)
    lo, hi = RANGES[name]
    if name == "patience":
        th = [data.draw(st.integers(lo, hi)) for _ in range(n_exits - 1)]
    else:
        th = [data.draw(st.floats(lo, hi)) for _ in range(n_exits - 1)]
    policy = create_policy(name, th if th else None)  # no early exit: the default
    got = policy.decide(out).tolist()
    assert got == [naive_exit(name, out, s, th) for s in range(b)]


def test_shared_threshold_equals_repeated_thresholds():
    out = outputs(4, 50, 5, 0)
    a = create_policy("max_prob", 0.6).decide(out)
    b = create_policy("max_prob", [0.6, 0.6, 0.6]).decide(out)
    assert torch.equal(a, b)


def test_entropy_keeps_the_branchynet_direction():
    # a confident prediction (low entropy) leaves; a uniform one (entropy log K) does not
    sure = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.zeros(1, 3)
    out = ExitOutputs([torch.cat([sure, unsure]), torch.zeros(2, 3)],
                      [torch.zeros(2), torch.full((2,), math.inf)])
    assert create_policy("entropy", -0.1).decide(out).tolist() == [0, 1]  # H < 0.1 leaves
    # inf: never leave here, as for every policy; -inf: always leave here
    assert create_policy("entropy", math.inf).decide(out).tolist() == [1, 1]
    assert create_policy("entropy", -math.inf).decide(out).tolist() == [0, 0]


def test_first_exit_broadcasts_over_threshold_vectors():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.1]])
    ths = torch.tensor([[0.5, 0.5], [0.95, 0.05]]).unsqueeze(1)  # (T=2, 1, N=2)
    assert first_exit(scores, ths).tolist() == [[0, 1, 2], [1, 1, 1]]


@pytest.mark.parametrize("name,bad", [("confidence", 1.5), ("confidence", 0.0),
                                      ("max_prob", -0.1), ("entropy", 1.0), ("entropy", 0.0)])
def test_thresholds_out_of_range_are_rejected(name, bad):
    with pytest.raises(EENetError, match="outside"):
        create_policy(name, bad)


def test_wrong_number_of_thresholds_and_unknown_policy():
    with pytest.raises(EENetError, match="3 thresholds given for 2 early exits"):
        create_policy("confidence", [0.5, 0.5, 0.5]).decide(outputs(3, 2, 3, 0))
    with pytest.raises(EENetError, match="accepted: confidence, entropy, max_prob, patience"):
        create_policy("softmax", 0.5)
