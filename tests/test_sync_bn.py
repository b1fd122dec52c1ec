"""Synchronised BatchNorm on CPU: two gloo processes equal one process with the whole batch."""

from __future__ import annotations

import os

import pytest
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


@pytest.mark.slow  # two gloo processes, 11 s; test_ddp checks a two-process run in make test
def test_two_processes_equal_one_batchnorm_on_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(8, 3, 5, 5)  # a large mean: tests the variance's precision
    w = torch.randn(8, 3, 5, 5)
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, x, w, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]

    def one_process(dtype):
        ref = nn.BatchNorm2d(3).to(dtype)
        for _ in range(2):
            xr = x.to(dtype).clone().requires_grad_()
            y = ref(xr)
            ((y * w.to(dtype)).sum() / x.shape[0]).backward()
        return {"y": y.detach(), "xgrad": xr.grad,  # the second step's output and input gradient
                "wgrad": ref.weight.grad, "bgrad": ref.bias.grad,
                "mean": ref.running_mean, "var": ref.running_var}

    ref, ref64 = one_process(torch.float32), one_process(torch.float64)
    got = {"y": torch.cat([r[0]["y"], r[1]["y"]]), "xgrad": torch.cat([r[0]["xgrad"], r[1]["xgrad"]]),
           **{k: r[0][k] for k in ("wgrad", "bgrad", "mean", "var")}}
    # The noise floor: the largest relative float32 error of the one-process BatchNorm against
    # float64, over every quantity. Two processes compute the same function in float32 with
    # sums split and reduced in another order: each quantity may be off float64 by 8x that
    # relative to its magnitude (two errors' draws 2x, the split sums and the reduction 2x, two
    # steps 2x); measured at most 2.9x over seeds 0-5.
    floor = max(float((ref[k].double() - ref64[k]).abs().max() / ref64[k].abs().max()) for k in ref)
    assert 0 < floor < 2 ** -24 * 2 ** 6  # float32 rounding (measured 1.6-3.6 units of 2**-24)
    for k in got:
        torch.testing.assert_close(got[k].double(), ref64[k], rtol=0,
                                   atol=8 * floor * float(ref64[k].abs().max()), msg=lambda m, k=k: f"{k}: {m}")
    for k in ("wgrad", "bgrad", "mean", "var"):  # reduced across processes: the same on both
        assert torch.equal(r[0][k], r[1][k]), k


def test_single_process_falls_back_to_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    bn = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]
    x = torch.randn(6, 4, 3, 3)
    # without a process group it runs nn.BatchNorm2d's own forward: the same operations, to the bit
    assert torch.equal(bn(x), ref(x))
    assert torch.equal(bn.running_var, ref.running_var)
