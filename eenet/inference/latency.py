"""Per-exit latency: measured wall-clock time to reach and evaluate each exit.

MACs say what an exit costs in arithmetic; on a real machine time also depends
on memory traffic and per-layer overhead, which weigh most at batch size 1.
For every exit i this measures, on the running machine, the time for a batch
to go through the segments up to exit i (``net.walk()``) and every exit head 0..i (what
a sample leaving at exit i really runs), at the batch sizes asked for. The
medians let a user calibrate for a latency budget as well as a MACs budget
(divide by the final exit's time for a latency fraction).
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from eenet.models.early_exit import EarlyExitNetwork


def run_to_exit(net: EarlyExitNetwork, x: torch.Tensor, exit_index: int) -> torch.Tensor:
    """Run the steps (``net.walk()``) up to ``exit_index`` with every exit head on the way;
    its logits. Any network with a walk: staged or cut from a traced graph."""
    logits, live = None, (x,)
    for j, step in enumerate(net.walk()):
        live = step.body(live)
        logits, _, live = step.head(live)
        if j == exit_index:
            break
    return logits


def exit_latency_table(net: EarlyExitNetwork, input_size: Sequence[int],
                       batch_sizes: Sequence[int] = (1, 256), repeats: int = 30,
                       warmup: int = 3, min_seconds: float = 0.0) -> list[dict]:
    """Median milliseconds per batch to reach and evaluate each exit, per batch size.

    Returns rows ``{"exit", "batch_size", "ms_per_batch", "us_per_sample",
    "fraction_of_final", "repeats"}``. ``min_seconds`` keeps repeating a
    measurement until that much time was spent (more samples on fast exits).
    """
    was_training = net.training
    net.eval()
    rows = []
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                x = torch.randn(bs, *input_size)
                times = []
                for i in range(net.num_exits):
                    for _ in range(warmup):
                        run_to_exit(net, x, i)
                    samples, spent = [], 0.0
                    while len(samples) < repeats or spent < min_seconds:
                        t0 = time.perf_counter()
                        run_to_exit(net, x, i)
                        dt = time.perf_counter() - t0
                        samples.append(dt)
                        spent += dt
                    times.append((statistics.median(samples), len(samples)))
                final = times[-1][0]
                for i, (t, n) in enumerate(times):
                    rows.append({"exit": f"exit{i}", "batch_size": bs, "ms_per_batch": 1e3 * t,
                                 "us_per_sample": 1e6 * t / bs, "fraction_of_final": t / final,
                                 "repeats": n})
    finally:
        net.train(was_training)
    return rows
