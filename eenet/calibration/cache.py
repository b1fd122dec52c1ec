"""Every exit's outputs on one split, cached by one static pass.

Calibration (:mod:`eenet.calibration.search`), the anytime view and the
reports evaluate any threshold vector on these cached outputs without running
the network again. The static pass is ``net(x)``, which walks the same steps
(``net.walk()``) as the dynamic engine, for a staged backbone and for a model
cut from a traced graph (:class:`eenet.models.graph_split.GraphSplitNetwork`) alike.
The inputs meet the dynamic engine's contract (:func:`eenet.inference.engine.check_input`): a batch with NaN or infinite
values, or of an integer dtype, is refused in one line rather than calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from eenet.errors import EENetError
from eenet.inference.engine import check_input
from eenet.models.early_exit import EarlyExitNetwork, ExitOutputs


@dataclass
class CachedExits:
    """Every exit's logits and confidence logits on one split, and the targets."""

    logits: list[torch.Tensor]
    conf_logits: list[torch.Tensor]
    targets: torch.Tensor

    @property
    def outputs(self) -> ExitOutputs:
        return ExitOutputs(self.logits, self.conf_logits)

    @property
    def correct(self) -> torch.Tensor:
        """(B, N+1) bool: exit i predicts sample b correctly."""
        return torch.stack([lg.argmax(1) for lg in self.logits], 1) == self.targets.unsqueeze(1)

    def __len__(self) -> int:
        return self.targets.numel()


def cache_exit_outputs(net: EarlyExitNetwork, batches: Iterable, device: str | torch.device = "cpu"
                       ) -> CachedExits:
    """One static pass (eval mode) over ``(x, y)`` batches, keeping every exit's outputs."""
    was_training = net.training
    net.eval()
    logits: list[list[torch.Tensor]] = []
    conf: list[list[torch.Tensor]] = []
    ys = []
    try:
        with torch.inference_mode():
            for x, y in batches:
                out = net(check_input(net, x.to(device)))
                if not logits:
                    logits = [[] for _ in out.logits]
                    conf = [[] for _ in out.conf_logits]
                for i, (lg, z) in enumerate(zip(out.logits, out.conf_logits)):
                    logits[i].append(lg.float().cpu())
                    conf[i].append(z.float().cpu())
                ys.append(y.cpu())
    finally:
        net.train(was_training)
    if not ys:
        raise EENetError("no batches to calibrate on (is the validation split empty?)")
    return CachedExits([torch.cat(v) for v in logits], [torch.cat(v) for v in conf], torch.cat(ys))
