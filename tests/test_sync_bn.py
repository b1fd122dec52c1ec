"""Synchronised BatchNorm on CPU: two gloo processes equal one process with the whole batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eenet.training.sync_bn import DistributedBatchNorm2d, convert_batchnorm


def _worker(rank: int, world: int, port: int, x: torch.Tensor, w: torch.Tensor, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bn = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
        assert isinstance(bn, DistributedBatchNorm2d)
        for _ in range(2):  # two steps: running statistics accumulate
            xs = x.chunk(world)[rank].clone().requires_grad_()
            y = bn(xs)
            # the global loss is the mean over the whole batch; each rank holds its share
            loss = (y * w.chunk(world)[rank]).sum() / x.shape[0]
            loss.backward()
        grads = [p.grad.clone() for p in bn.parameters()]
        for g in grads:
            dist.all_reduce(g)  # what DDP does (it averages; here the loss is already global)
        torch.save({"y": y.detach(), "xgrad": xs.grad, "wgrad": grads[0], "bgrad": grads[1],
                    "mean": bn.running_mean, "var": bn.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_batchnorm_on_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(8, 3, 5, 5)  # a large mean: tests the variance's precision
    w = torch.randn(8, 3, 5, 5)
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, x, w, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]

    ref = nn.BatchNorm2d(3)
    for _ in range(2):
        xr = x.clone().requires_grad_()
        y = ref(xr)
        ((y * w).sum() / x.shape[0]).backward()
    torch.testing.assert_close(torch.cat([r[0]["y"], r[1]["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    # the second step's input gradient
    torch.testing.assert_close(torch.cat([r[0]["xgrad"], r[1]["xgrad"]]), xr.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r[0]["wgrad"], ref.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r[0]["bgrad"], ref.bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r[0]["mean"], ref.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r[0]["var"], ref.running_var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r[1]["var"], ref.running_var, atol=1e-5, rtol=1e-5)


def test_single_process_falls_back_to_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    bn = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
