"""Per-exit latency: measured wall-clock time to reach and evaluate each exit.

MACs say what an exit costs in arithmetic; on a real machine time also depends
on memory traffic and per-layer overhead, which weigh most at batch size 1.
For every exit i this measures, on the running machine, the time for a batch
to go through the segments up to exit i (``net.walk()``) and every exit head 0..i (what
a sample leaving at exit i really runs), at the batch sizes asked for. The
medians let a user calibrate for a latency budget as well as a MACs budget
(divide by the final exit's time for a latency fraction).

For a backend (:mod:`eenet.inference.backends`) :func:`latency_cost_table` times the engine
itself, forced to release every sample at exit i (the policy's thresholds: never leave before
i, always leave at i), so the table holds what the dynamic run pays at that exit: the segments,
the heads, the policy's scores and the bookkeeping. Its per-exit milliseconds are the cost the
:class:`eenet.calibration.search.Calibrator` takes for ``budget_ms``: the expected per-sample
time of thresholds t is E[t] = sum_i rate_i(t) x ms_i, and ``budget_p95_ms`` bounds the expected
p95 (:func:`exit_time_quantile`: the smallest ms_i whose exits with ms <= ms_i take >= 95 % of
the samples). :func:`tail_latency` measures the per-sample latency distribution of a dynamic
run at batch size 1 (p50, p95, p99, max, mean).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from eenet.errors import EENetError
from eenet.models.early_exit import EarlyExitNetwork
from eenet.policies import create_policy


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


TAIL_KEYS = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms", "backend")


def _percentile(sorted_ms: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation between order statistics (numpy's default)."""
    pos = (len(sorted_ms) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def tail_latency(engine, samples, warmup: int = 10) -> dict:
    """Per-sample latency of ``engine`` at batch size 1 over ``samples`` (an iterable of
    (1, C, H, W) tensors or a (B, C, H, W) tensor cut into single samples).

    Each call is timed with ``time.perf_counter`` around the whole engine call (input check,
    segments, heads, policy). Returns ``{"p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms",
    "backend", "samples", "exit_ms"}``: percentiles interpolated between order statistics;
    ``exit_ms`` the mean time of the samples that left at each exit (None where none did).
    """
    return tail_latencies({"engine": engine}, samples, warmup)["engine"]


def tail_latencies(engines: dict, samples, warmup: int = 10, block: int = 100
                   ) -> dict[str, dict]:
    """:func:`tail_latency` of several engines on the same samples, interleaved by blocks:
    each block of ``block`` samples runs on every engine in turn, the order rotating from
    block to block, so that a slow spell of a shared machine falls on all of them, while
    within a block each engine runs sample after sample as it would alone (switching engines
    at every sample evicts the caches between calls, which slowed the per-exit times measured
    here by up to 70 %, see :func:`latency_cost_table`). One dict per key of ``engines``."""
    if isinstance(samples, torch.Tensor):
        samples = [samples[i:i + 1] for i in range(samples.shape[0])]
    samples = list(samples)
    if not samples:
        raise EENetError("tail_latency needs at least one sample")
    names = list(engines)
    times: dict[str, list] = {name: [None] * len(samples) for name in names}
    exits: dict[str, list] = {name: [None] * len(samples) for name in names}
    for b, start in enumerate(range(0, len(samples), block)):
        chunk = range(start, min(start + block, len(samples)))
        shift = b % len(names)
        for name in names[shift:] + names[:shift]:
            engine = engines[name]
            for x in samples[:warmup] if b == 0 else ():
                engine(x)
            for k in chunk:
                t0 = time.perf_counter()
                out = engine(samples[k])
                times[name][k] = 1e3 * (time.perf_counter() - t0)
                exits[name][k] = int(out.exit[0])
    return {name: _summary(engines[name], times[name], exits[name]) for name in names}


def _summary(engine, times: list[float], exits: list[int]) -> dict:
    srt = sorted(times)
    per_exit: dict[int, list[float]] = {}
    for e, t in zip(exits, times):
        per_exit.setdefault(e, []).append(t)
    n_exits = len(getattr(engine, "costs", [])) or (max(exits) + 1)
    return {"p50_ms": _percentile(srt, 50), "p95_ms": _percentile(srt, 95),
            "p99_ms": _percentile(srt, 99), "max_ms": srt[-1], "mean_ms": sum(times) / len(times),
            "backend": getattr(engine, "backend", "eager"), "samples": len(times),
            "exit_ms": [statistics.fmean(per_exit[i]) if i in per_exit else None
                        for i in range(n_exits)]}


def exit_time_quantile(exit_ms: torch.Tensor, exit_rates: torch.Tensor, q: float
                       ) -> torch.Tensor:
    """The q-quantile (q in [0, 1]) of a discrete per-sample time, for T exit distributions
    at once: a sample leaving at exit i takes ``exit_ms[t, i]`` with probability
    ``exit_rates[t, i]`` (both (T, N+1)); the quantile is the smallest ms_i with

        sum_{j : ms_j <= ms_i} rate_j >= q,

    the largest time where the rates sum below q (no samples). Returns (T,). For q > 0, exits
    of rate 0 never decide it (the cumulative rate only grows at exits that release samples)."""
    times, order = exit_ms.sort(dim=1)
    reached = exit_rates.gather(1, order).cumsum(1) >= q - 1e-12  # rates are counts / n
    last = torch.full((times.shape[0],), times.shape[1] - 1, dtype=torch.long)
    first = torch.where(reached.any(1), reached.int().argmax(1), last)
    return times.gather(1, first.view(-1, 1)).view(-1)


@dataclass
class LatencyCostTable:
    """Measured time per sample to leave at each exit, as a cost for the calibrator.

    Attributes:
        ms: per exit 0..N, the mean time per sample of a dynamic run whose samples all leave
            there (every earlier head run), at ``batch_size``.
        head_ms: per early exit, what leaving its head out saves (its head and policy score,
            timed on its own input), 0 where it is not skippable.
        skippable_heads: whether each early exit's head may be left out when idle.
        batch_size, backend: where it was measured.
        median_ms: per exit, the median of the same calls (recorded; empty when not measured).
    """

    ms: list[float]
    head_ms: list[float]
    skippable_heads: list[bool]
    batch_size: int
    backend: str
    repeats: int = 0
    exits: list[str] = field(default_factory=list)
    median_ms: list[float] = field(default_factory=list)

    # the interface the Calibrator reads (as eenet.cost.CostTable's), in units of the final exit
    @property
    def final_ms(self) -> float:
        return self.ms[-1]

    @property
    def fractions(self) -> list[float]:
        return [m / self.final_ms for m in self.ms]

    @property
    def head_fractions(self) -> list[float]:
        return [m / self.final_ms for m in self.head_ms]

    def skippable(self) -> list[bool]:
        return list(self.skippable_heads)

    def exit_ms(self, idle: Sequence[bool] | None = None) -> list[float]:
        """Per exit i, ms_i less the head_ms of the idle (skippable) early exits before i,
        whose heads the engine leaves out; ``ms`` itself when ``idle`` is None."""
        idle = list(idle or [False] * len(self.head_ms))
        out, saved = [], 0.0
        for i, m in enumerate(self.ms):
            out.append(m - saved)
            if i < len(self.head_ms) and idle[i] and self.skippable_heads[i]:
                saved += self.head_ms[i]
        return out

    def expected_ms(self, exit_rates: Sequence[float],
                    idle: Sequence[bool] | None = None) -> float:
        """E[time per sample] = sum_i rate_i x :meth:`exit_ms` (idle)_i."""
        return sum(r * m for r, m in zip(exit_rates, self.exit_ms(idle)))

    def expected_percentile_ms(self, exit_rates: Sequence[float], q: float,
                               idle: Sequence[bool] | None = None) -> float:
        """The expected q-th percentile (q in [0, 100]) of the time per sample if a sample
        leaving at exit i took :meth:`exit_ms` (idle)_i (the times :meth:`expected_ms`
        averages): :func:`exit_time_quantile` at q / 100."""
        times = torch.tensor([self.exit_ms(idle)], dtype=torch.float64)
        rates = torch.tensor([list(exit_rates)], dtype=torch.float64)
        return float(exit_time_quantile(times, rates, q / 100)[0])

    def to_dict(self) -> dict:
        return {"ms": self.ms, "median_ms": self.median_ms, "head_ms": self.head_ms,
                "skippable": self.skippable_heads, "batch_size": self.batch_size,
                "backend": self.backend, "repeats": self.repeats, "fractions": self.fractions}


def _time_ms(fn, repeats: int, warmup: int, min_seconds: float) -> tuple[float, float, int]:
    """``(median ms, mean ms, calls)`` of ``fn`` timed call by call."""
    for _ in range(warmup):
        fn()
    samples, spent = [], 0.0
    while len(samples) < repeats or spent < min_seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    return 1e3 * statistics.median(samples), 1e3 * statistics.fmean(samples), len(samples)


def latency_cost_table(engine, input_size: Sequence[int], batch_size: int = 1,
                       repeats: int = 50, warmup: int = 5, min_seconds: float = 0.0,
                       seed: int = 0) -> LatencyCostTable:
    """Per-exit time per sample of ``engine`` (a DynamicEngine or a backend's engine) at
    ``batch_size``: the mean time of the engine's own call with every sample forced out at
    exit i, divided by the batch size (module docstring; the medians are kept as
    ``median_ms``). The mean, because the expected mean time per sample is the rate-weighted
    mean of the per-exit means, and per-call times are skewed to the right (a call now and
    then is slowed by the machine), so medians understate it. A backend's engine is timed
    through its own call (its thread handling included)."""
    from eenet.inference.backends import BackendEngine

    steps = getattr(engine, "steps", None) or engine._steps
    net = engine.net
    n_early = net.num_exits - 1
    name = engine.policy.name
    always = engine.policy.always_leave
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(seed))
    ms, medians, repeats_done = [], [], 0
    for i in range(net.num_exits):
        thr = [math.inf] * n_early
        if i < n_early:
            thr[i] = always
        # the engine's steps and, for a backend, its call (plain fractions: every head runs)
        forced_policy, plain = create_policy(name, thr), [0.0] * net.num_exits
        forced = (engine.with_policy(forced_policy, plain) if isinstance(engine, BackendEngine)
                  else BackendEngine(net, forced_policy, plain, steps, "eager", 0.0))
        # exit by exit, not the exits in turn: timing them in turn evicts the caches between
        # calls; measured on the mnist_budget model at batch 1, 1 thread, eager: exit 0 took
        # 0.82-0.85 ms in turn against 0.48 ms exit by exit, and the engine itself 0.50-0.52
        # ms (median) on 300 test samples, 99.5 % of which left at exit 0 (load average 4.8)
        t_med, t, n = _time_ms(lambda: forced(x), repeats, warmup, min_seconds)
        ms.append(t / batch_size)
        medians.append(t_med / batch_size)
        repeats_done = max(repeats_done, n)
    # what an idle head saves: the head and the policy's score on the head's own input
    head_ms, skippable = [], []
    with torch.inference_mode():
        live: tuple = (x,)
        for j, step in enumerate(steps[:-1]):
            live = step.body(live)
            state = engine.policy.initial_state(batch_size, x.device)

            def head_and_score(step=step, live=live, state=state):
                logits, z, _ = step.head(live)
                return engine.policy.score_at(j, logits, z, state)
            skip = step.skippable and not engine.policy.needs_every_exit
            head_ms.append(_time_ms(head_and_score, repeats, warmup, 0.0)[1] / batch_size
                           if skip else 0.0)
            skippable.append(skip)
            _, _, live = step.head(live)
    return LatencyCostTable(ms=ms, head_ms=head_ms, skippable_heads=skippable,
                            batch_size=batch_size, backend=getattr(engine, "backend", "eager"),
                            repeats=repeats_done, exits=net.exit_names(), median_ms=medians)
