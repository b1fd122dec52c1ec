"""Dynamic inference: real per-sample early exit for any batch size.

The engine walks the network's steps (``net.walk()``: the same modules in the
same order as the static path) over the *live values*: the stage output of a
staged backbone, plus what a later exit reads (T-RecX's carried features), or
every tensor a later segment of a cut graph reads (its skip connections,
:mod:`eenet.models.graph_split`). After each early exit it applies the policy,
writes out the samples that leave, and continues with only the remaining
samples of every live value, so later segments run only on what remains; when
nothing remains it stops. Batch size 1 is the special case where a sample either leaves
or the whole batch goes on; it takes a short path without the bookkeeping of
sample indices (the same modules and the same decisions, compared as Python
floats, which is exact: the thresholds are float32 values like the scores).

This is the difference with the papers' code, which either runs at batch size 1
only (EENets, SDN) or computes every exit for every sample and picks one
afterwards (MSDNet, PTEENet, T-RecX), saving nothing. The result equals the
static all-exits forward followed by the policy (tested), and the compute it
saves is real (measured by ``experiments/bench/bench_inference.py``).

An exit whose threshold never releases a sample (``inf``, which calibration
chooses for exits that do not pay for themselves) is idle: given the cost table,
the engine runs only the stages there and not the head, and reports the cost
without it (``CostTable.fractions_skipping``). Not for the patience policy,
whose scores count every exit's prediction, nor for a step whose head is not
skippable (an exit whose features the final classifier reads, T-RecX mitigation).

Streaming (:meth:`DynamicEngine.stream`, for throughput): called batch by batch, the
engine runs the steps after an exit on the few samples that go on (1.5 % of a batch of 256
in the MNIST benchmark: about 4), where the cost of a call, not of the arithmetic,
dominates. ``stream(batches)`` pools them across input batches instead: the samples that
go on after exit j wait, with their live values, their policy state and their place
(batch number, position), until the pool of step j + 1 holds ``min_batch`` of them (the
first batch's size by default), or its oldest sample is ``max_wait`` batches old (16 by
default), or the input ends; then step j + 1 runs on the whole pool. The decisions are
those of the per-batch engine (same policy, thresholds, idle exits, costs); only the
rounding of a pooled batch can differ, as between any two batch sizes. Outputs come one
per input batch, in input order, each as soon as every sample of it and of the batches
before it has left. The price is latency: a sample that goes on waits for later batches
to fill its pool, so a batch is yielded up to ``max_wait`` batches later than the
per-batch engine would return it (None: until the pools fill, at worst the end of the
input), and the outputs of the batches behind it are held meanwhile. For serving a
request at a time, call the engine.

Input contract (:func:`check_input`, also usable before a static forward): a
``torch.Tensor`` of shape (B, C, H, W) (NCHW, any B; C, and H and W for a
fixed-size network, as the network was built for), on the network's device,
already normalised as the data module does it (``(x - mean) / std`` of values
in the data set's range). Floating point input (float16, bfloat16, float64) is
converted to the network's parameter dtype (float32 for eenet's networks): a
copy, and the only conversion made. Integer input (uint8 images, int64, ...)
and bool are refused: the engine does not know the data set's scaling and
normalisation, so it says what to pass instead. Samples with NaN or infinite
values are refused (one line naming the first of them), never classified: a
NaN passes no threshold and would silently leave at the final exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from eenet.cost import CostTable
from eenet.errors import EENetError
from eenet.models.early_exit import EarlyExitNetwork, Step
from eenet.policies import ExitPolicy


def check_input(net: EarlyExitNetwork, x, param: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` checked against the input contract (module docstring) and converted to the
    network's dtype; raises :class:`EENetError` (one line) for anything else. ``param``: one
    of the network's parameters (its dtype and device), when the caller keeps one (looking
    it up walks every submodule, a cost that counts at batch size 1)."""
    if not isinstance(x, torch.Tensor):
        raise EENetError(f"input must be a torch.Tensor (B, C, H, W), got {type(x).__name__}; "
                         f"for a numpy array pass torch.from_numpy(x)")
    if param is None:
        param = next(net.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    if not torch.is_floating_point(x):
        what = ("uint8 images (0..255) must first be scaled to the data set's range and "
                "normalised as the data module does: ((x.float() / 255) - mean) / std"
                if x.dtype == torch.uint8 else "pass a float32 tensor")
        raise EENetError(f"input of dtype {x.dtype} is not accepted (floating point only, "
                         f"normalised values, converted to {dtype}): {what}")
    net.check_input(x)  # shape: (batch, C, H, W)
    if param is not None and x.device != param.device:
        raise EENetError(f"input is on {x.device} but the network on {param.device}: "
                         f"move it first, x.to('{param.device}')")
    x = x.to(dtype)
    if not _all_finite(x):
        bad = (~torch.isfinite(x).flatten(1).all(1)).nonzero().flatten()
        raise EENetError(f"input holds NaN or infinite values in {bad.numel()} of {x.shape[0]} "
                         f"samples (the first: sample {int(bad[0])}); they are refused, not "
                         f"classified: drop or repair those samples")
    return x


def _segment_and_head(step: Step, live: tuple) -> tuple:
    """A step's segment and then its exit head: ``(logits, confidence logits, live)``, in one
    call when the backend fused them (``step.fused``)."""
    if step.fused is not None:
        return step.fused(live)
    return step.head(step.body(live))


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite; on the CPU through numpy (a view, no copy),
    whose check costs a few microseconds where PyTorch's takes about 20 at batch size 1.
    Counting the finite values instead of ``.all()`` (a ufunc reduction): measured inside
    the onnxruntime engine's batch-1 call on the 2-core AMD EPYC (mnist_budget, 400 MNIST
    test images, median of 5), the check added 0.017 ms per image with ``.all()`` and 0.009
    counted."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
            and not x.requires_grad:
        a = x.numpy()
        return np.count_nonzero(np.isfinite(a)) == a.size
    return bool(torch.isfinite(x).all())


@dataclass
class DynamicOutput:
    """Per-sample results of a dynamic run.

    Attributes:
        pred: predicted class (B,).
        exit: index of the exit each sample left at, 0..N (B,).
        cost: the cost fraction paid by each sample (B,), from the cost table.
        logits: the logits of the exit each sample left at (B, K), when kept; as the
            network gives them, not divided by a policy's temperature (softmax(logits / T_i)
            are the calibrated probabilities of exit i).
    """

    pred: torch.Tensor
    exit: torch.Tensor
    cost: torch.Tensor
    logits: torch.Tensor | None = None


class DynamicEngine:
    """Run an early-exit network with real per-sample early exit.

    Args:
        net: the network (must be in eval mode when called).
        policy: the exit policy with its thresholds (and temperatures, if any: exit j's
            score is then that of its logits / T_j, as on the static path).
        cost_fractions: the cost table (``eenet.cost.exit_cost_table``), to report each
            sample's cost and to skip the heads of idle exits; or plain fractions
            c_0..c_N, which count every head, so that every head then runs.
        keep_logits: also return the logits of each sample's exit.
    """

    def __init__(self, net: EarlyExitNetwork, policy: ExitPolicy,
                 cost_fractions: CostTable | Sequence[float] | None = None,
                 keep_logits: bool = False):
        self._steps: list[Step] = net.walk()  # refused by networks without real early exit
        self.net = net
        #: a parameter of the network: its dtype and device, read at every call (``net.to()``
        #: moves the same Parameter objects)
        self._param = next(net.parameters(), None)
        self.policy = policy
        n_early = net.num_exits - 1
        self.thresholds = policy.threshold_vector(n_early).tolist()
        policy.check_exits(net.num_exits)  # its temperatures, if any: one per exit
        skip = [False] * n_early
        if cost_fractions is None or isinstance(cost_fractions, CostTable):
            skip = [idle and self._steps[j].skippable
                    for j, idle in enumerate(policy.idle_exits(n_early))]
        if isinstance(cost_fractions, CostTable):
            costs = cost_fractions.fractions_skipping(skip)
        elif cost_fractions is not None:
            costs = list(cost_fractions)
        else:
            costs = [float("nan")] * net.num_exits
        if len(costs) != net.num_exits:
            raise EENetError(f"{len(costs)} cost fractions for {net.num_exits} exits")
        #: early exits whose heads are not run (they release no sample)
        self.skipped = skip
        self.costs = torch.tensor(costs, dtype=torch.float32)
        self.keep_logits = keep_logits

    def __call__(self, x: torch.Tensor) -> DynamicOutput:
        """Run a batch ``x`` (B, C, H, W), normalised, finite; see :func:`check_input`.

        float16 / bfloat16 / float64 input is converted to the network's dtype (float32);
        integer input, NaN or inf, and wrong shapes are refused with one line.
        """
        x = self._checked(x)
        with torch.inference_mode():
            return self._run_one(x) if x.shape[0] == 1 else self._run(x)

    def _check_mode(self) -> None:
        if self.net.training:
            raise EENetError("the dynamic engine runs in eval mode only: call net.eval() first "
                             "(BatchNorm and dropout must not use batch statistics)")

    def _checked(self, x) -> torch.Tensor:
        """``x`` checked and converted (:func:`check_input`), in eval mode."""
        self._check_mode()
        return check_input(self.net, x, self._param)

    def _run_one(self, x: torch.Tensor) -> DynamicOutput:
        """Batch size 1: the sample leaves at the first exit whose score passes its threshold."""
        state = self.policy.initial_state(1, x.device)
        live: tuple = (x,)
        last = len(self._steps) - 1
        for j, step in enumerate(self._steps):
            if j < last and self.skipped[j]:  # an idle exit: segment only
                live = step.body(live)
                continue
            logits, z, live = _segment_and_head(step, live)
            if j == last:  # the final exit
                break
            score, state = self.policy.score_at(j, logits, z, state)
            if score.item() > self.thresholds[j]:
                break
        return DynamicOutput(pred=logits.argmax(1),
                             exit=torch.full((1,), j, dtype=torch.long, device=x.device),
                             cost=self.costs[j:j + 1].to(x.device, copy=True),
                             logits=logits.clone() if self.keep_logits else None)

    def _run(self, x: torch.Tensor) -> DynamicOutput:
        b = x.shape[0]
        device = x.device
        pred = torch.empty(b, dtype=torch.long, device=device)
        exit_idx = torch.empty(b, dtype=torch.long, device=device)
        out_logits = None
        remaining = torch.arange(b, device=device)
        state = self.policy.initial_state(b, device)
        live: tuple = (x,)  # every value a later step reads, for the remaining samples
        j = 0
        while True:
            j, logits, leave, live, state = self._next_exit(j, live, state)
            if out_logits is None and self.keep_logits:
                out_logits = torch.empty(b, logits.shape[1], dtype=logits.dtype, device=device)
            if leave is None:
                ids, chosen = remaining, logits
            else:
                ids, chosen = remaining[leave], logits[leave]
            if ids.numel():
                pred[ids] = chosen.argmax(1)
                exit_idx[ids] = j
                if out_logits is not None:
                    out_logits[ids] = chosen
            if leave is None:
                break
            if ids.numel() == remaining.numel():
                break  # every sample has left: later segments never run
            if ids.numel():
                stay = ~leave
                remaining = remaining[stay]
                live = tuple(v[stay] for v in live)
                state = tuple(s[stay] for s in state)
            j += 1
        return DynamicOutput(pred=pred, exit=exit_idx, cost=self.costs.to(device)[exit_idx],
                             logits=out_logits)

    def _next_exit(self, j: int, live: tuple, state: tuple) -> tuple:
        """From step ``j`` on: the segments of idle exits, then the first step whose head
        runs. Returns ``(its index, its logits, which samples leave there (a mask; None at
        the final exit, which takes them all), the live values and the policy state after
        it)``."""
        last = len(self._steps) - 1
        while j < last and self.skipped[j]:  # an idle exit: segment only
            live = self._steps[j].body(live)
            j += 1
        logits, z, live = _segment_and_head(self._steps[j], live)
        if j == last:
            return j, logits, None, live, state
        score, state = self.policy.score_at(j, logits, z, state)
        return j, logits, score > self.thresholds[j], live, state

    # ---- streaming: the samples that go on are pooled across input batches -----------------

    def stream(self, batches: Iterable[torch.Tensor], min_batch: int | None = None,
               max_wait: int | None = 16) -> Iterator[DynamicOutput]:
        """Run every batch of ``batches`` (each as :meth:`__call__` takes it), pooling the
        samples that go on after an exit across batches (module docstring, *Streaming*).

        Yields one :class:`DynamicOutput` per input batch, in input order, as soon as every
        sample of that batch (and of every batch before it) has left.

        Args:
            batches: any iterable of (B, C, H, W) tensors; read lazily, one at a time.
            min_batch: a step after an early exit runs once its pool holds at least this many
                samples (default: the size of the first batch).
            max_wait: a pool also runs once its oldest sample's batch is this many batches
                behind the last batch read, so that a batch is yielded at the latest after the
                next ``max_wait`` batches have been read (0: no pooling across batches); None:
                no limit (a pool waits for ``min_batch`` samples or the end of the input).
        """
        if min_batch is not None and (not isinstance(min_batch, int) or isinstance(min_batch, bool)
                                      or min_batch < 1):
            raise EENetError(f"min_batch must be a whole number >= 1 (or None: the size of "
                             f"the first batch), got {min_batch!r}")
        if max_wait is not None and (not isinstance(max_wait, int) or isinstance(max_wait, bool)
                                     or max_wait < 0):
            raise EENetError(f"max_wait must be a whole number of batches >= 0 (or None: no "
                             f"limit), got {max_wait!r}")
        if isinstance(batches, torch.Tensor):
            raise EENetError("stream() takes an iterable of batches (a list, a generator, a "
                             "data loader's inputs); for one batch call the engine: engine(x)")
        try:
            it = iter(batches)
        except TypeError:
            raise EENetError(f"stream() takes an iterable of (B, C, H, W) tensors, got "
                             f"{type(batches).__name__}") from None
        self._check_mode()
        return self._stream(it, min_batch, max_wait)

    def _stream(self, batches: Iterator, min_batch: int | None, max_wait: int | None
                ) -> Iterator[DynamicOutput]:
        pools: dict[int, _Pool] = {}  # step index -> the samples waiting to run from it
        pending: dict[int, _Pending] = {}  # batch number -> its outputs so far
        first = 0  # the next batch to yield
        n = -1
        for n, x in enumerate(batches):
            x = self._checked(x)
            if min_batch is None:
                min_batch = max(1, x.shape[0])
            with torch.inference_mode():
                b, device = x.shape[0], x.device
                pending[n] = _Pending(b, device)
                if b == 0:  # nothing to pool; the engine's empty output (its logits' shape)
                    pending[n].logits = self._run(x).logits
                else:
                    self._stream_step(0, (x,), self.policy.initial_state(b, device),
                                      torch.full((b,), n, dtype=torch.long, device=device),
                                      torch.arange(b, device=device), pending, pools)
                for j in range(1, len(self._steps)):  # in step order: a run feeds later pools
                    pool = pools.get(j)
                    if pool is not None and (pool.size >= min_batch or (
                            max_wait is not None and pool.oldest <= n - max_wait)):
                        self._stream_step(j, *pools.pop(j).take(), pending, pools)
                ready, first = self._ready(pending, first)
            yield from ready
        with torch.inference_mode():  # the end of the input: every pool runs, in step order
            for j in range(1, len(self._steps)):
                if j in pools:
                    self._stream_step(j, *pools.pop(j).take(), pending, pools)
            ready, first = self._ready(pending, first)
        assert not pending and first == n + 1, "a sample was lost in a pool"
        yield from ready

    def _stream_step(self, j: int, live: tuple, state: tuple, batch: torch.Tensor,
                     pos: torch.Tensor, pending: dict, pools: dict) -> None:
        """Runs samples from step ``j`` to the next exit whose head runs: writes the outputs of
        those that leave there (``batch``: their batch numbers, in non-decreasing order;
        ``pos``: their positions in it) and pools the others for the step after it."""
        k, logits, leave, live, state = self._next_exit(j, live, state)
        if leave is None:
            gone_b, gone_p, chosen = batch, pos, logits
        else:
            gone_b, gone_p, chosen = batch[leave], pos[leave], logits[leave]
        if gone_b.numel():
            preds = chosen.argmax(1)
            if int(gone_b[0]) == int(gone_b[-1]):  # one batch (always so from step 0)
                parts = [(int(gone_b[0]), gone_p, preds, chosen)]
            else:
                nums, counts = torch.unique_consecutive(gone_b, return_counts=True)
                counts = counts.tolist()
                parts = zip(nums.tolist(), gone_p.split(counts), preds.split(counts),
                            chosen.split(counts))
            for num, p, pr, lg in parts:
                pending[num].write(p, pr, k, lg if self.keep_logits else None)
        if leave is None or gone_b.numel() == batch.numel():
            return
        if gone_b.numel():
            stay = ~leave
            live, state = tuple(v[stay] for v in live), tuple(s[stay] for s in state)
            batch, pos = batch[stay], pos[stay]
        pools.setdefault(k + 1, _Pool()).add(live, state, batch, pos)

    def _ready(self, pending: dict, first: int) -> tuple[list[DynamicOutput], int]:
        """The outputs of the batches from ``first`` on whose samples have all left (up to the
        first that has not), and the next batch to yield."""
        out = []
        while first in pending and pending[first].left == 0:
            out.append(pending.pop(first).output(self.costs))
            first += 1
        return out, first


class _Pool:
    """Samples waiting to run from one step on, in chunks (in batch order): their live values,
    their policy state, their batch numbers and positions."""

    def __init__(self):
        self.chunks: list[tuple] = []
        self.size = 0

    @property
    def oldest(self) -> int:
        """The batch number of the oldest waiting sample."""
        return int(self.chunks[0][2][0])

    def add(self, live: tuple, state: tuple, batch: torch.Tensor, pos: torch.Tensor) -> None:
        self.chunks.append((live, state, batch, pos))
        self.size += batch.numel()

    def take(self) -> tuple:
        """``(live, state, batch, pos)`` of every waiting sample, chunks concatenated."""
        if len(self.chunks) == 1:
            return self.chunks[0]
        live, state, batch, pos = zip(*self.chunks)
        return (tuple(torch.cat(v) for v in zip(*live)), tuple(torch.cat(s) for s in zip(*state)),
                torch.cat(batch), torch.cat(pos))


class _Pending:
    """The outputs of one input batch of a stream, filled in as its samples leave."""

    def __init__(self, b: int, device: torch.device):
        self.pred = torch.empty(b, dtype=torch.long, device=device)
        self.exit = torch.empty(b, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.left = b  # samples still on their way

    def write(self, pos: torch.Tensor, pred: torch.Tensor, j: int, logits: torch.Tensor | None
              ) -> None:
        self.pred[pos] = pred
        self.exit[pos] = j
        if logits is not None:
            if self.logits is None:
                self.logits = torch.empty(self.pred.shape[0], logits.shape[1], dtype=logits.dtype,
                                          device=logits.device)
            self.logits[pos] = logits
        self.left -= pos.numel()

    def output(self, costs: torch.Tensor) -> DynamicOutput:
        return DynamicOutput(pred=self.pred, exit=self.exit,
                             cost=costs.to(self.exit.device)[self.exit], logits=self.logits)
