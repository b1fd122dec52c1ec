"""Training losses for early-exit networks: EENets' cost-aware losses, multi-exit CE, schedules.

Notation: exits i = 0..N (N is the final exit), p_i = softmax(logits_i),
h_i = sigmoid(z_i) the confidence, c_i the exit's cost fraction (``eenet.cost``),
lambda >= 0.

EENets (Demir & Akbas, "Early-exit Convolutional Neural Networks", section 3.4)
mix the exits' predictions and costs backwards from the final exit:

    P_N = p_N,  C_N = c_N
    P_i = h_i p_i + (1 - h_i) P_{i+1}
    C_i = h_i c_i + (1 - h_i) C_{i+1}         for i = N-1 .. 0

    eenet_v1:  L = NLL(P_0, y) + lambda * mean(C_0)
    eenet_v2:  L = sum_{i=0..N} [ NLL(P_i, y) + lambda * mean(C_i) ]

The mixture is computed in log space,
log P_i = logaddexp(log h_i + log p_i, log(1 - h_i) + log P_{i+1}), with
log h = logsigmoid(z) and log(1 - h) = logsigmoid(-z), so it stays finite when
h_i rounds to exactly 0 or 1 in floating point.

``multi_ce`` is BranchyNet's weighted sum of per-exit cross-entropies
(Teerapittayanon et al., "BranchyNet", 2016): L = sum_i w_i CE(p_i, y). All
weights 1 is EENets' warm-up loss; ``ramp_epochs`` ramps the early exits'
weights linearly from ``ramp_start`` to their targets, as Shallow-Deep Networks
do (Kaya et al., "Shallow-Deep Networks", ICML 2019), and ``weights: cost``
sets each early exit's target to its cost fraction (SDN's relative position).
``TwoStageLoss`` runs one loss for K epochs and another afterwards.

``SumLoss`` adds losses: ``eenet_v2`` plus ``multi_ce`` (conf/loss/eenet_v2_ce.yaml)
keeps EENets' cost term for the confidence heads and gives every classifier
head its own cross-entropy as well. Without it, a branch whose confidence is
low receives almost no gradient through the mixture; on a frozen backbone
(PTEENet) the confidence heads then send nearly everything to the accurate
final exit and the branches stop improving (measured in
experiments/pteenet/run.py). This sum is eenet's option, not EENets'.

``ExitDistillation`` is self-distillation from the final exit (Phuong & Lampert,
"Distillation-Based Training for Multi-Exit Architectures", ICCV 2019; the
softened KL of Hinton et al., "Distilling the Knowledge in a Neural Network",
2015): L = sum_{i<N} w_i T^2 KL(softmax(z_N / T) || softmax(z_i / T)), the
teacher z_N detached. Every early exit learns the final exit's whole output
distribution rather than its label alone; on a frozen backbone (PTEENet) the
teacher is the backbone itself. conf/loss/eenet_v2_kd.yaml adds it to
eenet_v2_ce.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eenet.errors import EENetError, unknown_name


class ExitLoss(nn.Module):
    """Base class: ``loss(outputs, target, cost_fractions) -> {"loss": ..., ...}``.

    ``outputs`` has ``logits`` and ``conf_logits`` (lists over exits, final last);
    ``cost_fractions`` is a tensor of N+1 fractions. ``set_epoch`` lets schedules
    change with the epoch. ``uses_confidence`` says whether the loss trains the
    confidence heads (the gradient test uses it).
    """

    uses_confidence = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check(self, num_exits: int) -> None:
        """Raise an EENetError if the loss cannot serve a network with ``num_exits`` exits."""

    def for_validation(self) -> "ExitLoss":
        """The loss that validation reports, the same at every epoch.

        Model selection compares validation losses across epochs, so schedules
        report their final objective: a two-stage schedule its second loss, a
        ramped multi_ce its final weights.
        """
        return self

    def forward(self, outputs, target: torch.Tensor, cost_fractions: torch.Tensor) -> dict:
        raise NotImplementedError


def _check_lambda(lambda_coef: float) -> float:
    if not lambda_coef >= 0:
        raise EENetError(f"loss lambda_coef must be >= 0, got {lambda_coef}")
    return float(lambda_coef)


def mixture_log_probs(logits: Sequence[torch.Tensor], conf_logits: Sequence[torch.Tensor]
                      ) -> list[torch.Tensor]:
    """log P_i for every exit (each (B, K)), EENets' backward mixture in log space."""
    n = len(logits) - 1
    log_p = F.log_softmax(logits[n], dim=1)
    out = [log_p]
    for i in range(n - 1, -1, -1):
        z = conf_logits[i].unsqueeze(1)
        log_p = torch.logaddexp(F.logsigmoid(z) + F.log_softmax(logits[i], dim=1),
                                F.logsigmoid(-z) + log_p)
        out.append(log_p)
    return out[::-1]


def mixture_costs(conf_logits: Sequence[torch.Tensor], cost_fractions: torch.Tensor
                  ) -> list[torch.Tensor]:
    """C_i for every exit (each (B,)): expected cost of a sample entering exit i."""
    n = len(conf_logits) - 1
    c = cost_fractions[n].expand_as(conf_logits[0])
    out = [c]
    for i in range(n - 1, -1, -1):
        h = torch.sigmoid(conf_logits[i])
        c = h * cost_fractions[i] + (1 - h) * c
        out.append(c)
    return out[::-1]


def _mixture_target_log_probs(logits, conf_logits, target) -> list[torch.Tensor]:
    """log P_i[y] for every exit (each (B,)); only the target class is needed for the NLL."""
    idx = target.unsqueeze(1)
    n = len(logits) - 1
    lp = F.log_softmax(logits[n], dim=1).gather(1, idx).squeeze(1)
    out = [lp]
    for i in range(n - 1, -1, -1):
        z = conf_logits[i]
        own = F.log_softmax(logits[i], dim=1).gather(1, idx).squeeze(1)
        lp = torch.logaddexp(F.logsigmoid(z) + own, F.logsigmoid(-z) + lp)
        out.append(lp)
    return out[::-1]


class EENetLoss(ExitLoss):
    """EENets' classification-plus-cost loss, version 1 or 2 (see module docstring).

    Args:
        version: 1 (loss at the first exit's mixture) or 2 (sum over every exit's mixture).
        lambda_coef: weight of the cost term, >= 0.
    """

    def __init__(self, version: int = 2, lambda_coef: float = 1.0):
        super().__init__()
        if version not in (1, 2):
            raise EENetError(f"EENet loss version must be 1 or 2, got {version}")
        self.version = version
        self.lambda_coef = _check_lambda(lambda_coef)

    def forward(self, outputs, target, cost_fractions):
        log_py = _mixture_target_log_probs(outputs.logits, outputs.conf_logits, target)
        costs = mixture_costs(outputs.conf_logits, cost_fractions)
        if self.version == 1:
            nll, cost = -log_py[0].mean(), costs[0].mean()
        else:
            nll = -torch.stack(log_py).mean(1).sum()
            cost = torch.stack(costs).mean(1).sum()
        return {"loss": nll + self.lambda_coef * cost, "nll": nll.detach(), "cost": cost.detach()}


class MultiExitCE(ExitLoss):
    """Weighted sum of per-exit cross-entropies (BranchyNet; SDN's ramp as an option).

    Args:
        weights: one weight per exit (final last), ``None`` for all ones, or
            ``"cost"`` for each early exit's cost fraction (final exit 1).
        ramp_epochs: when > 0, early-exit weights grow linearly from
            ``ramp_start`` at epoch 0 to their targets at epoch ``ramp_epochs``.
        ramp_start: the early-exit weight at epoch 0 of the ramp.
        label_smoothing: epsilon of label smoothing (Szegedy et al., "Rethinking the
            Inception Architecture", CVPR 2016, sec. 7): every exit's target is
            ``(1 - eps) * onehot(y) + eps / K``; 0 is plain cross-entropy.
    """

    uses_confidence = False

    def __init__(self, weights: Sequence[float] | str | None = None, ramp_epochs: int = 0,
                 ramp_start: float = 0.01, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise EENetError(f"multi_ce label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        if isinstance(weights, str) and weights != "cost":
            raise EENetError(f"multi_ce weights must be a list, null or 'cost', got '{weights}'")
        if weights is not None and not isinstance(weights, str):
            weights = [float(w) for w in weights]
            if any(w < 0 for w in weights):
                raise EENetError(f"multi_ce weights must be >= 0, got {weights}")
        if ramp_epochs < 0:
            raise EENetError(f"multi_ce ramp_epochs must be >= 0, got {ramp_epochs}")
        self.weights = weights
        self.ramp_epochs = int(ramp_epochs)
        self.ramp_start = float(ramp_start)
        self.epoch = 0

    def for_validation(self) -> "MultiExitCE":
        if not self.ramp_epochs:
            return self
        return MultiExitCE(self.weights, ramp_epochs=0, label_smoothing=self.label_smoothing)

    def check(self, num_exits: int) -> None:
        if isinstance(self.weights, list) and len(self.weights) != num_exits:
            raise EENetError(f"multi_ce has {len(self.weights)} weights for {num_exits} exits")

    def exit_weights(self, n_exits: int, cost_fractions: torch.Tensor) -> list[float]:
        if self.weights is None:
            target = [1.0] * n_exits
        elif self.weights == "cost":
            target = [float(c) for c in cost_fractions[:-1]] + [1.0]
        else:
            if len(self.weights) != n_exits:
                raise EENetError(f"multi_ce has {len(self.weights)} weights for {n_exits} exits")
            target = list(self.weights)
        if self.ramp_epochs:
            t = min(1.0, self.epoch / self.ramp_epochs)
            target = [self.ramp_start + (w - self.ramp_start) * t for w in target[:-1]] + target[-1:]
        return target

    def forward(self, outputs, target, cost_fractions):
        w = self.exit_weights(len(outputs.logits), cost_fractions)
        ces = [F.cross_entropy(lg, target, label_smoothing=self.label_smoothing)
               for lg in outputs.logits]
        loss = sum(wi * ce for wi, ce in zip(w, ces))
        return {"loss": loss, "nll": loss.detach()}


class ExitDistillation(ExitLoss):
    """Self-distillation of every early exit from the final exit, at temperature T.

    ``L = sum_{i<N} w_i T^2 KL(p_N^T || p_i^T)`` with ``p^T = softmax(z / T)`` and the
    final exit's logits detached (Phuong & Lampert, ICCV 2019; Hinton et al., 2015).
    The T^2 keeps the gradient's scale independent of T. The target labels are not
    used; the final exit learns nothing from this term.

    Args:
        temperature: T > 0 (Hinton et al.: T > 1 softens the teacher).
        weights: one weight per early exit, or ``None`` for all ones.
    """

    uses_confidence = False

    def __init__(self, temperature: float = 4.0, weights: Sequence[float] | None = None):
        super().__init__()
        if not temperature > 0:
            raise EENetError(f"distillation temperature must be > 0, got {temperature}")
        if weights is not None:
            weights = [float(w) for w in weights]
            if any(w < 0 for w in weights):
                raise EENetError(f"distillation weights must be >= 0, got {weights}")
        self.temperature = float(temperature)
        self.weights = weights

    def check(self, num_exits: int) -> None:
        if num_exits < 2:
            raise EENetError("distillation from the final exit needs at least one early exit")
        if self.weights is not None and len(self.weights) != num_exits - 1:
            raise EENetError(f"distillation has {len(self.weights)} weights for "
                             f"{num_exits - 1} early exits")

    def forward(self, outputs, target, cost_fractions):
        t = self.temperature
        early = outputs.logits[:-1]
        self.check(len(outputs.logits))
        teacher = F.log_softmax(outputs.logits[-1].detach() / t, dim=1)
        w = self.weights if self.weights is not None else [1.0] * len(early)
        loss = sum(wi * F.kl_div(F.log_softmax(z / t, dim=1), teacher, log_target=True,
                                 reduction="batchmean")
                   for wi, z in zip(w, early)) * t * t
        return {"loss": loss, "nll": loss.detach()}


class TwoStageLoss(ExitLoss):
    """``first`` for ``first_epochs`` epochs, then ``second`` (EENets: multi_ce warm-up, then eenet)."""

    def __init__(self, first: ExitLoss, second: ExitLoss, first_epochs: int):
        super().__init__()
        if first_epochs < 0:
            raise EENetError(f"two-stage first_epochs must be >= 0, got {first_epochs}")
        self.first, self.second, self.first_epochs = first, second, int(first_epochs)
        self.set_epoch(0)

    @property
    def current(self) -> ExitLoss:
        return self.first if self.epoch < self.first_epochs else self.second

    @property
    def uses_confidence(self) -> bool:  # type: ignore[override]
        return self.current.uses_confidence

    def check(self, num_exits: int) -> None:
        self.first.check(num_exits)
        self.second.check(num_exits)

    def for_validation(self) -> ExitLoss:
        return self.second.for_validation()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.first.set_epoch(epoch)
        self.second.set_epoch(epoch - self.first_epochs)

    def forward(self, outputs, target, cost_fractions):
        return self.current(outputs, target, cost_fractions)


class SumLoss(ExitLoss):
    """The sum of several losses, each with a weight: ``sum_k w_k L_k``.

    Args:
        terms: name -> loss; the result reports every term's value as
            ``{name}`` next to the total ``loss`` (and the first term's ``cost``
            when it has one).
        weights: name -> weight (missing names: 1).
    """

    def __init__(self, terms: dict, weights: dict | None = None):
        super().__init__()
        if not terms:
            raise EENetError("a sum loss needs at least one term")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(terms))
        if unknown:
            raise EENetError(f"sum loss weights for unknown terms {unknown}; "
                             f"terms: {sorted(terms)}")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {k: float(weights.get(k, 1.0)) for k in terms}
        if any(w < 0 for w in self.weights.values()):
            raise EENetError(f"sum loss weights must be >= 0, got {self.weights}")
        self.set_epoch(0)

    @property
    def uses_confidence(self) -> bool:  # type: ignore[override]
        return any(t.uses_confidence for t in self.terms.values())

    def check(self, num_exits: int) -> None:
        for t in self.terms.values():
            t.check(num_exits)

    def for_validation(self) -> "SumLoss":
        val = {k: t.for_validation() for k, t in self.terms.items()}
        if all(val[k] is t for k, t in self.terms.items()):
            return self
        return SumLoss(val, self.weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for t in self.terms.values():
            t.set_epoch(epoch)

    def forward(self, outputs, target, cost_fractions):
        total, report = 0.0, {}
        for name, term in self.terms.items():
            parts = term(outputs, target, cost_fractions)
            total = total + self.weights[name] * parts["loss"]
            report[name] = parts["loss"].detach()
            if "cost" in parts and "cost" not in report:
                report["cost"] = parts["cost"]
        return {"loss": total, "nll": total.detach(), **report}


LOSSES = {"eenet_v1": lambda **kw: EENetLoss(version=1, **kw),
          "eenet_v2": lambda **kw: EENetLoss(version=2, **kw),
          "multi_ce": MultiExitCE,
          "distill": ExitDistillation}


def create_loss(name: str, **kwargs) -> ExitLoss:
    """Build a loss by name: ``eenet_v1``, ``eenet_v2``, ``multi_ce`` or ``distill``."""
    if name not in LOSSES:
        raise unknown_name("loss", name, LOSSES)
    return LOSSES[name](**kwargs)
