"""Exit policies: when does a sample leave at an early exit?

Every policy turns exit i's outputs into a score s_i ("higher means surer") and
a sample leaves at the first early exit with s_i > t_i; a sample that no early
exit releases leaves at the final exit. So for every policy a threshold of
``inf`` means "never leave here" and ``-inf`` "always leave here", in the
engine, the calibration, ``results.json``, the ONNX manifest and its runner.
Decisions are vectorised over a batch and, for calibration, over many
threshold vectors at once.

- ``confidence``: the EENets confidence head, exit when h_i > t_i
  (Demir & Akbas, "Early-exit Convolutional Neural Networks").
- ``max_prob``: exit when max_k p_i[k] > t_i (Shallow-Deep Networks, Kaya et
  al. 2019; T-RecX, Ghanathe & Wilton).
- ``entropy``: BranchyNet's criterion, exit when the entropy
  H(p_i) = -sum_k p_i[k] log p_i[k] (nats) is small (Teerapittayanon, McDanel &
  Kung, "BranchyNet: Fast Inference via Early Exiting from Deep Neural
  Networks", ICPR 2016). The score is the negative entropy s_i = -H(p_i), in
  (-log K, 0], and a sample leaves when -H(p_i) > t_i, i.e. H(p_i) < -t_i: a
  threshold t = -0.5 lets out the samples whose entropy is below 0.5 nats.
  Before results format 2 / manifest format 2 the threshold was the entropy
  itself (leave when H < t), so ``inf`` meant "always leave"; those files are
  refused (:func:`eenet.reporting.results.check_thresholds_readable`).
- ``patience``: exit when the last k exits, this one included, agree on the
  class (PABEE, Zhou et al., "BERT Loses Patience", NeurIPS 2020); t_i = k, a
  whole number >= 1 (or ``inf``).

Policies can score one exit at a time (``score_at`` with a carried state),
which is what the dynamic inference engine does, or all exits of a static
forward at once (``scores``); both give the same numbers.

Temperatures. A ``max_prob`` or ``entropy`` policy may carry one temperature
T_i > 0 per exit (the final exit included, as
:func:`eenet.calibration.temperature.fit_temperatures` fits them on val; Guo et
al., "On Calibration of Modern Neural Networks", ICML 2017): exit i's score is
then computed from softmax(z_i / T_i) instead of softmax(z_i), everywhere the
policy scores (``score_at``, ``scores``; so the calibration on cached outputs,
the static path and the dynamic engine), and the ONNX manifest records them for
its runner. Dividing by T > 0 keeps every argmax, so predictions do not change,
only which samples a threshold releases. ``confidence`` (EENets' learned
confidence head, a sigmoid of its own logit, not a softmax of the class logits)
and ``patience`` (argmaxes only) have no logits temperature: they refuse one in
one line (:data:`TEMPERATURE_POLICIES`). Without temperatures a policy computes
exactly what it computed before they existed (no division at all).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from eenet.errors import EENetError, unknown_name


class ExitPolicy:
    """Base class. Subclasses define ``exit_score`` and the threshold range.

    Args:
        thresholds: one shared threshold or one per early exit; ``inf`` (or the
            string ``"inf"``, as JSON files hold it) means "never leave here",
            ``-inf`` "always leave here" (patience: 1). ``None``: the policy's
            ``default_threshold``.
        temperatures: ``None`` (no scaling), or one T_i > 0 per exit, the final exit
            included (module docstring); only for the policies that score a softmax
            (``uses_temperature``).
    """

    name = "policy"
    #: open interval of valid thresholds, for checking a user's input
    valid_range: tuple[float, float] = (-math.inf, math.inf)
    #: whether exit i's score depends on earlier exits' outputs (then every head must
    #: run, even at an exit whose threshold never releases a sample)
    needs_every_exit = False
    #: the threshold used when none is given (user units)
    default_threshold: float = 0.5
    #: the threshold that releases every sample (user units), for calibration's searches
    always_leave: float = -math.inf
    #: whether the score is a softmax of the exit's logits, which a temperature rescales
    uses_temperature = False

    def __init__(self, thresholds: float | Sequence[float] | None = None,
                 temperatures: Sequence[float] | None = None):
        if thresholds is None:
            thresholds = self.default_threshold
        try:
            if isinstance(thresholds, (int, float, str)):
                self.thresholds: float | list[float] = _number(thresholds)
                values = [self.thresholds]
            else:
                self.thresholds = [_number(t) for t in thresholds]
                values = self.thresholds
        except (TypeError, ValueError):
            raise EENetError(f"{self.name} thresholds must be numbers (or 'inf' / '-inf'), one "
                             f"shared or one per early exit; got {thresholds!r}") from None
        for t in values:
            self.check_threshold(t)
        self.temperatures: list[float] | None = None
        if temperatures is not None:
            if not self.uses_temperature:
                raise EENetError(no_temperature_message(self.name))
            self.temperatures = check_temperatures(temperatures)
            # T_i rounded to float32 once (as Python floats: a float32 tensor divided by one
            # divides by exactly that float32 value, with no tensor made per call)
            self._divisors = torch.tensor(self.temperatures, dtype=torch.float32).tolist()

    def check_threshold(self, t: float) -> None:
        """Raise (one line) unless ``t`` is a valid threshold in the user's units."""
        lo, hi = self.valid_range
        if not lo < t < hi and not math.isinf(t):
            raise EENetError(f"{self.name} threshold {t} is outside ({lo:g}, {hi:g}); "
                             f"inf: never leave here, -inf: always leave here")

    def threshold_vector(self, num_early_exits: int) -> torch.Tensor:
        """Thresholds t_0..t_{N-1} as a tensor in score units."""
        if isinstance(self.thresholds, float):
            t = [self.thresholds] * num_early_exits
        else:
            if len(self.thresholds) != num_early_exits:
                raise EENetError(f"{len(self.thresholds)} thresholds given for "
                                 f"{num_early_exits} early exits")
            t = self.thresholds
        return self.to_score_units(torch.tensor(t, dtype=torch.float32))

    def to_score_units(self, t: torch.Tensor) -> torch.Tensor:
        """Map thresholds in the user's units to score units (identity by default)."""
        return t

    def from_score_units(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_score_units`."""
        return t

    def initial_state(self, batch: int, device: torch.device) -> tuple:
        return ()

    def exit_score(self, logits: torch.Tensor, conf_logit: torch.Tensor, state: tuple
                   ) -> tuple[torch.Tensor, tuple]:
        """Score (B,) of one exit's outputs as given (no temperature) and the state carried
        to the next exit."""
        raise NotImplementedError

    def check_exits(self, num_exits: int) -> None:
        """Raise (one line) unless the temperatures, if any, are one per exit of a network
        with ``num_exits`` exits (the final exit included)."""
        if self.temperatures is not None and len(self.temperatures) != num_exits:
            raise EENetError(f"{len(self.temperatures)} temperatures given for {num_exits} exits "
                             f"(one per exit, the final exit included)")

    def score_at(self, i: int, logits: torch.Tensor, conf_logit: torch.Tensor, state: tuple
                 ) -> tuple[torch.Tensor, tuple]:
        """Score (B,) of early exit ``i`` and the carried state: :meth:`exit_score` of
        z_i / T_i when the policy carries temperatures, of z_i otherwise.

        The division is in float32 (the network's logits' dtype, T_i rounded to float32),
        as the ONNX runner does it, so both make the same decisions.
        """
        if self.temperatures is not None:
            logits = logits.float() / self._divisors[i]
        return self.exit_score(logits, conf_logit, state)

    def scores(self, outputs) -> torch.Tensor:
        """Scores (B, N) of the N early exits of a static forward (final exit excluded)."""
        logits, conf = outputs.logits, outputs.conf_logits
        self.check_exits(len(logits))
        state = self.initial_state(logits[0].shape[0], logits[0].device)
        out = []
        for i in range(len(logits) - 1):
            s, state = self.score_at(i, logits[i], conf[i], state)
            out.append(s)
        if not out:
            return torch.empty(logits[0].shape[0], 0, device=logits[0].device)
        return torch.stack(out, 1)

    def decide(self, outputs) -> torch.Tensor:
        """Exit index (B,) of every sample of a static forward: 0..N."""
        scores = self.scores(outputs)
        return first_exit(scores, self.threshold_vector(scores.shape[1]).to(scores.device))

    def idle_exits(self, num_early_exits: int) -> list[bool]:
        """Early exits that never release a sample under these thresholds (``inf``) and
        whose heads the policy does not need for later exits' scores."""
        if self.needs_every_exit:
            return [False] * num_early_exits
        return [math.isinf(t) and t > 0 for t in self.threshold_vector(num_early_exits).tolist()]

    def describe(self) -> dict:
        """Name and thresholds, and the temperatures when the policy carries them."""
        d = {"name": self.name, "thresholds": self.thresholds}
        if self.temperatures is not None:
            d["temperatures"] = list(self.temperatures)
        return d


def check_temperatures(temperatures: Sequence[float], num_exits: int | None = None) -> list[float]:
    """One finite T > 0 per exit (the final exit included), or one error line; ``num_exits``
    None: any number of them."""
    if isinstance(temperatures, (str, bytes)) or not hasattr(temperatures, "__len__"):
        raise EENetError(f"temperatures must be a list of numbers > 0, one per exit, got "
                         f"{temperatures!r}")
    try:
        temps = [_number(t) for t in temperatures]
    except (TypeError, ValueError):
        raise EENetError(f"temperatures must be a list of numbers > 0, got {temperatures!r}") \
            from None
    if num_exits is not None and len(temps) != num_exits:
        raise EENetError(f"{len(temps)} temperatures given for {num_exits} exits (one per exit, "
                         f"the final exit included)")
    for i, t in enumerate(temps):
        if not (math.isfinite(t) and t > 0):
            raise EENetError(f"temperature of exit {i} must be a finite number > 0, got {t}")
    return temps


def no_temperature_message(name: str, instead: str = "no temperature") -> str:
    """Why policy ``name`` takes no temperature (one line), ending with what to do ``instead``."""
    what = ("scores its own confidence head (sigmoid of a learned logit, EENets), not a softmax "
            "of the class logits" if name == "confidence" else
            "reads only the exits' argmaxes, which a temperature does not change")
    return (f"temperatures rescale the class logits that the {' and '.join(TEMPERATURE_POLICIES)} "
            f"policies score; the {name} policy {what}: use policy=max_prob or policy=entropy, "
            f"or {instead}")


def _number(t) -> float:
    """A threshold as a float; ``bool`` is refused (``True`` is not a threshold)."""
    if isinstance(t, bool):
        raise TypeError("a bool is not a threshold")
    return float(t)


def first_exit(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the first early exit whose score beats its threshold, N when none does.

    ``scores`` is (..., B, N) and ``thresholds`` broadcasts against it (e.g.
    (N,) or (T, 1, N) for T threshold vectors); the result is (..., B).
    """
    leave = scores > thresholds
    n = scores.shape[-1]
    final = torch.ones(*leave.shape[:-1], 1, dtype=torch.bool, device=leave.device)
    leave = torch.cat([leave, final], dim=-1)  # the final exit always releases
    # argmax of a boolean row returns its first True (ties go to the first index)
    return leave.to(torch.uint8).argmax(dim=-1).clamp_max(n)


class ConfidencePolicy(ExitPolicy):
    """EENets: exit when the confidence head's h_i > t_i."""

    name = "confidence"
    valid_range = (0.0, 1.0)

    def exit_score(self, logits, conf_logit, state):
        return torch.sigmoid(conf_logit), state


class MaxProbPolicy(ExitPolicy):
    """SDN / T-RecX: exit when the largest softmax probability > t_i."""

    name = "max_prob"
    valid_range = (0.0, 1.0)
    uses_temperature = True

    def exit_score(self, logits, conf_logit, state):
        return F.softmax(logits.float(), dim=1).amax(dim=1), state


class EntropyPolicy(ExitPolicy):
    """BranchyNet (Teerapittayanon et al., ICPR 2016): exit when -H(p_i) > t_i, i.e. H(p_i) < -t_i.

    The score is the negative entropy -H (nats) rather than a normalised certainty
    such as 1 - H / log K: it is BranchyNet's own quantity with the sign that makes
    "higher means surer", it does not depend on the number of classes K, and an
    entropy threshold h of the previous rule (leave when H < h, h > 0) is out of
    this policy's range (t < 0), so an old setting is refused instead of silently
    meaning something else. ``inf``: never leave here, as for every policy.
    """

    name = "entropy"
    valid_range = (-math.inf, 0.0)  # -H <= 0, so t >= 0 would release nobody: use inf
    default_threshold = -0.5  # H < 0.5 nats
    uses_temperature = True

    def check_threshold(self, t):
        if t >= 0 and not math.isinf(t):
            raise EENetError(f"entropy threshold {t} is outside (-inf, 0): the entropy policy "
                             f"leaves when -H(p) > t (negative entropy in nats), so t = -h lets "
                             f"out the samples with entropy H < h; inf: never leave here")
        super().check_threshold(t)

    def exit_score(self, logits, conf_logit, state):
        logp = F.log_softmax(logits.float(), dim=1)
        return (logp.exp() * logp).sum(dim=1), state  # = -H(p)


class PatiencePolicy(ExitPolicy):
    """PABEE: exit when the last k exits (this one included) predict the same class; t_i = k.

    k is a whole number >= 1 (1: leave at this exit whatever the earlier exits said)
    or ``inf`` (never leave here); anything else, ``-inf`` included, is refused.
    """

    name = "patience"
    valid_range = (0.0, math.inf)
    needs_every_exit = True  # the run length counts every exit's prediction
    default_threshold = 2.0
    always_leave = 1.0  # a run of one: this exit's own prediction

    def check_threshold(self, t):
        if not (t == math.inf or (t >= 1 and float(t).is_integer())):
            raise EENetError(f"patience threshold {t} is not a whole number of exits >= 1: "
                             f"give k = 1, 2, ... (leave when the last k exits agree; 1: always "
                             f"leave here) or inf (never leave here)")

    def to_score_units(self, t):
        return t - 0.5  # run length >= k  <=>  run length > k - 0.5

    def from_score_units(self, t):
        return t + 0.5

    def initial_state(self, batch, device):
        return (torch.full((batch,), -1, dtype=torch.long, device=device),
                torch.zeros(batch, device=device))

    def exit_score(self, logits, conf_logit, state):
        prev, run = state
        pred = logits.argmax(dim=1)
        run = torch.where(pred == prev, run + 1, torch.ones_like(run))
        return run, (pred, run)


POLICIES = {p.name: p for p in (ConfidencePolicy, MaxProbPolicy, EntropyPolicy, PatiencePolicy)}
#: The policies whose score is a softmax of the exit's logits: they take temperatures.
TEMPERATURE_POLICIES = tuple(n for n, p in POLICIES.items() if p.uses_temperature)


def create_policy(name: str, thresholds: float | Sequence[float] | None = None,
                  temperatures: Sequence[float] | None = None) -> ExitPolicy:
    """Build a policy by name: ``confidence``, ``max_prob``, ``entropy`` or ``patience``.

    Every policy is built here, so its thresholds are checked here, in one line each:
    ``confidence`` and ``max_prob`` in (0, 1), ``entropy`` in (-inf, 0) (-H units),
    ``patience`` a whole number >= 1; ``inf`` (never leave here) for all, ``-inf``
    (always leave here) for all but patience. ``None``: the policy's default.
    ``temperatures``: one T_i > 0 per exit (final included), ``max_prob`` and ``entropy`` only.
    """
    if name not in POLICIES:
        raise unknown_name("exit policy", name, POLICIES)
    return POLICIES[name](thresholds, temperatures)
