"""Per-exit metrics of an early-exit network as one torchmetrics ``Metric``.

From the static path (all exits) it accumulates, for a split:

- each exit's accuracy (``exit{i}/acc``);
- the accuracy of EENets' mixture P_0 (``mixture_acc``) and its expected cost
  E[C_0] (``expected_cost``), see ``eenet.losses``;
- under an exit policy (default: confidence > 0.5), each exit's exit rate
  (``exit{i}/rate``), the resulting accuracy (``acc``) and average cost
  fraction (``avg_cost``);
- overthinking (Kaya, Hong & Dumitras, "Shallow-Deep Networks", ICML 2019):
  per exit, the share of samples it classifies correctly while the final exit
  gets them wrong ("destructive overthinking", ``exit{i}/overthinking``), and
  the accuracy of an oracle that picks, per sample, any exit that is right
  (``oracle_acc``).

States are sums, reduced across processes by torchmetrics under DDP.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from eenet.losses import mixture_costs, mixture_log_probs
from eenet.policies import ExitPolicy


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

    def compute(self) -> dict[str, float | list[float]]:
        n = max(int(self.total), 1)
        rates = (self.exit_count.double() / n).tolist()
        out: dict = {
            "acc": float(self.policy_correct) / n,
            "avg_cost": float((self.exit_count.double() * self.costs).sum()) / n,
            "exit_acc": (self.exit_correct.double() / n).tolist(),
            "exit_rates": rates,
            "overthinking": (self.overthink.double() / n).tolist(),
            "oracle_acc": float(self.oracle_correct) / n,
            "n": int(self.total),
        }
        if self.mixture:
            out["mixture_acc"] = float(self.mixture_correct) / n
            out["expected_cost"] = float(self.expected_cost) / n
        return out


def flat_log_dict(stage: str, values: dict) -> dict[str, float]:
    """``{"exit_acc": [a0, a1]}`` -> ``{"val/exit0/acc": a0, "val/exit1/acc": a1}`` and so on."""
    out = {}
    for key, v in values.items():
        if key == "exit_acc":
            out.update({f"{stage}/exit{i}/acc": a for i, a in enumerate(v)})
        elif key == "exit_rates":
            out.update({f"{stage}/exit{i}/rate": r for i, r in enumerate(v)})
        elif key == "overthinking":
            out.update({f"{stage}/exit{i}/overthinking": r for i, r in enumerate(v[:-1])})
        elif key != "n":
            out[f"{stage}/{key}"] = v
    return out
