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
from typing import Sequence

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
    whose check costs a few microseconds where PyTorch's takes about 20 at batch size 1."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
            and not x.requires_grad:
        return bool(np.isfinite(x.numpy()).all())
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
        if self.net.training:
            raise EENetError("the dynamic engine runs in eval mode only: call net.eval() first "
                             "(BatchNorm and dropout must not use batch statistics)")
        x = check_input(self.net, x, self._param)
        with torch.inference_mode():
            return self._run_one(x) if x.shape[0] == 1 else self._run(x)

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
        last = len(self._steps) - 1
        for j, step in enumerate(self._steps):
            if j < last and self.skipped[j]:  # an idle exit: segment only
                live = step.body(live)
                continue
            logits, z, live = _segment_and_head(step, live)
            if j == last:  # the final exit takes everything that is left
                leave = None
            else:
                score, state = self.policy.score_at(j, logits, z, state)
                leave = score > self.thresholds[j]
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
        return DynamicOutput(pred=pred, exit=exit_idx, cost=self.costs.to(device)[exit_idx],
                             logits=out_logits)
