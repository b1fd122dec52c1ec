"""Overthinking counts (Kaya, Hong & Dumitras, "Shallow-Deep Networks", ICML 2019) against
a hand-computed case and a loop over samples.

Per exit i: the samples exit i classifies right while the final exit gets them
wrong (destructive overthinking; 0 at the final exit itself); and the samples
that some exit classifies right (the oracle that may pick any exit per sample).
"""

from __future__ import annotations

import math

import pytest
import torch

from eenet.models.early_exit import ExitOutputs
from eenet.policies import create_policy
from eenet.training.metrics import ExitMetrics, overthinking_counts


def test_overthinking_counts_of_a_hand_computed_case():
    correct = torch.tensor([[1, 0, 1],   # right at exit 0 and at the end: no overthinking
                            [1, 1, 0],   # exits 0 and 1 right, the end wrong: both overthink
                            [0, 1, 0],   # exit 1 right, the end wrong
                            [0, 0, 0]],  # nobody right
                           dtype=torch.bool)
    over, oracle = overthinking_counts(correct)
    assert over.tolist() == [1, 2, 0]
    assert int(oracle) == 3


def loop_counts(correct: torch.Tensor) -> tuple[list[int], int]:
    b, n = correct.shape
    over = [sum(1 for s in range(b) if correct[s, i] and not correct[s, n - 1]) for i in range(n)]
    oracle = sum(1 for s in range(b) if any(bool(correct[s, i]) for i in range(n)))
    return over, oracle


@pytest.mark.parametrize("seed", range(5))
def test_overthinking_counts_equal_a_loop_over_samples(seed):
    g = torch.Generator().manual_seed(seed)
    correct = torch.rand(50, 2 + seed, generator=g) < 0.5
    over, oracle = overthinking_counts(correct)
    assert (over.tolist(), int(oracle)) == loop_counts(correct)


def test_exit_metrics_accumulate_overthinking_over_batches():
    """ExitMetrics (the figures in results.json and the logs) over three batches equal the
    loop's counts over all samples divided by their number; the per-exit accuracy too."""
    g = torch.Generator().manual_seed(0)
    k, n_exits = 4, 3
    metric = ExitMetrics([0.3, 0.6, 1.0], create_policy("confidence", 0.5), mixture=False)
    all_correct = []
    for size in (7, 13, 20):
        y = torch.randint(0, k, (size,), generator=g)
        logits = [torch.randn(size, k, generator=g) for _ in range(n_exits)]
        conf = [torch.randn(size, generator=g) for _ in range(n_exits - 1)]
        conf.append(torch.full((size,), math.inf))
        metric.update(ExitOutputs(logits, conf), y)
        all_correct.append(torch.stack([lg.argmax(1) == y for lg in logits], 1))
    correct = torch.cat(all_correct)
    over, oracle = loop_counts(correct)
    got = metric.compute()
    assert got.overthinking == pytest.approx([o / 40 for o in over], abs=1e-15)
    assert got.oracle_acc == pytest.approx(oracle / 40, abs=1e-15)
    assert got.exit_accuracy == pytest.approx(correct.double().mean(0).tolist(), abs=1e-15)
    assert got.overthinking[-1] == 0
