"""Synchronised BatchNorm across processes, on CPUs as well as GPUs.

Under DDP each process normalises its share of a global batch; with plain
BatchNorm the statistics are per process, so W processes train a different
network from one process with the same global batch. torch's
``nn.SyncBatchNorm`` fixes that on GPUs only ("SyncBatchNorm layers only work
with GPU modules"). :class:`DistributedBatchNorm2d` does it with any backend
(gloo on CPUs): in training it sums, over all processes, the per-channel sums
and counts with the differentiable
``torch.distributed.nn.functional.all_reduce``, normalises with the global
mean and (biased) variance, and updates the running statistics with the
global mean and the unbiased variance, as BatchNorm does on one process:

    mean = S / n,   var = sum (x - mean)^2 / n,   running_var <- (1-m) running_var + m var n/(n-1)

(two all-reduces: the mean first, then the squared deviations from it, which is
as precise as one process's BatchNorm; E[x^2] - mean^2 is not, in float32).

Gradients flow through the all-reduce (its backward is again a sum), so the
parameter gradients, once DDP averages them, equal those of one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        # two passes, as precise as BatchNorm's own: the global mean, then the
        # global sum of squared deviations from it
        first = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = first[-1]
        mean = first[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(
                    self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        y = centred * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_batchnorm(module: nn.Module, use_torch_sync: bool = False) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` (in place) by a synchronised one.

    ``use_torch_sync`` picks torch's ``nn.SyncBatchNorm`` (GPUs); otherwise
    :class:`DistributedBatchNorm2d` (any device). Parameters and running
    statistics are kept.
    """
    if use_torch_sync:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = DistributedBatchNorm2d(child.num_features, child.eps, child.momentum,
                                         child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module
