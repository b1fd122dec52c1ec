"""Per-exit metrics of an early-exit network as one torchmetrics ``Metric``.

From the static path (all exits) it accumulates, for a split, sums that
:meth:`ExitMetrics.compute` turns into a :class:`eenet.reporting.results.SplitResult`
(the vocabulary of ``results.json``; the formulas are there):

- each exit's accuracy (``exit_accuracy``);
- the accuracy of EENets' mixture P_0 (``mixture_acc``) and its expected cost
  E[C_0] (``expected_cost``), see ``eenet.losses``;
- under an exit policy (default: confidence > 0.5), each exit's exit rate
  (``exit_rates``), the resulting ``accuracy`` and ``avg_cost_fraction``;
- overthinking (Kaya, Hong & Dumitras, "Shallow-Deep Networks", ICML 2019):
  per exit, the share of samples it classifies correctly while the final exit
  gets them wrong ("destructive overthinking", ``overthinking``), and the
  accuracy of an oracle that picks, per sample, any exit that is right
  (``oracle_acc``).

Logged under the short keys of lightning-hydra-template, which checkpoint
monitors, sweeps and dashboards name (:data:`LOG_KEYS`): ``val/acc``,
``val/avg_cost``, ``val/exit0/acc``, ``val/exit0/rate``, ... States are sums,
reduced across processes by torchmetrics under DDP.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from eenet.losses import mixture_costs, mixture_log_probs
from eenet.policies import ExitPolicy
from eenet.reporting.results import SplitResult

#: SplitResult field -> logged key under ``{stage}/`` (per-exit lists: ``{stage}/exit{i}/...``)
LOG_KEYS = {"accuracy": "acc", "avg_cost_fraction": "avg_cost", "mixture_acc": "mixture_acc",
            "expected_cost": "expected_cost", "oracle_acc": "oracle_acc", "loss": "loss"}
PER_EXIT_LOG_KEYS = {"exit_accuracy": "acc", "exit_rates": "rate", "overthinking": "overthinking"}


def overthinking_counts(correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From (B, N+1) per-exit correctness: per exit, samples right there but wrong at the
    final exit (destructive overthinking), and samples some exit gets right (oracle)."""
    return (correct & ~correct[:, -1:]).sum(0), correct.any(1).sum()


class ExitMetrics(Metric):
    """Accumulates per-exit and policy statistics (see module docstring)."""

    full_state_update = False

    def __init__(self, cost_fractions: Sequence[float], policy: ExitPolicy, mixture: bool = True):
        super().__init__()
        n = len(cost_fractions)
        self.num_exits = n
        self.policy = policy
        self.mixture = mixture
        self.register_buffer("costs", torch.tensor(list(cost_fractions), dtype=torch.float64),
                             persistent=False)
        self.add_state("exit_correct", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("exit_count", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("policy_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("mixture_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("expected_cost", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("overthink", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("oracle_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, outputs, target: torch.Tensor) -> None:
        logits = [lg.detach() for lg in outputs.logits]
        conf = [z.detach() for z in outputs.conf_logits]
        preds = torch.stack([lg.argmax(1) for lg in logits], 1)  # (B, N+1)
        correct = preds == target.unsqueeze(1)
        self.exit_correct += correct.sum(0)
        over, oracle = overthinking_counts(correct)
        self.overthink += over
        self.oracle_correct += oracle
        chosen = self.policy.decide(type(outputs)(logits, conf))
        self.exit_count += torch.bincount(chosen, minlength=self.num_exits)
        self.policy_correct += correct.gather(1, chosen.unsqueeze(1)).sum()
        if self.mixture:
            mix = mixture_log_probs(logits, conf)[0].argmax(1)
            self.mixture_correct += (mix == target).sum()
            costs = self.costs.to(logits[0].dtype)
            self.expected_cost += mixture_costs(conf, costs)[0].double().sum()
        self.total += target.numel()

    def compute(self) -> SplitResult:
        return SplitResult.from_counts(
            self.exit_count, self.policy_correct, self.costs, exit_correct=self.exit_correct,
            overthink=self.overthink, oracle_correct=self.oracle_correct,
            mixture_correct=self.mixture_correct if self.mixture else None,
            expected_cost_sum=self.expected_cost if self.mixture else None)


def flat_log_dict(stage: str, split: SplitResult) -> dict[str, float]:
    """A split's values under their logged keys (:data:`LOG_KEYS`), e.g. ``val/acc``,
    ``val/exit0/acc``; the final exit has no overthinking entry (it is 0 by definition)."""
    out = {}
    for name, key in LOG_KEYS.items():
        if getattr(split, name) is not None:
            out[f"{stage}/{key}"] = getattr(split, name)
    for name, key in PER_EXIT_LOG_KEYS.items():
        values = getattr(split, name)
        if values is not None:
            if name == "overthinking":
                values = values[:-1]
            out.update({f"{stage}/exit{i}/{key}": v for i, v in enumerate(values)})
    return out
