"""Training step time in channels-last (NHWC) against the default (NCHW) memory order, on a CPU.

``channels_last=true`` (eenet-train; eenet.training.EarlyExitModule) keeps the conv weights
and the input batches in NHWC order. This measures what that buys for the CIFAR-10 recipe's
networks: each network is built from its experiment config (``--experiments``, default the
recipe's resnet20, resnet20 with SDN's six exits, and ResNet-8), and one training step
(forward, cross-entropy on every exit, backward, SGD with Nesterov momentum) on a batch of
``--batch`` (256, the recipe's) 3x32x32 inputs is timed in both orders, alternating NCHW /
NHWC step by step so that both see the same load, ``--steps`` timed steps after
``--warmup`` untimed ones, ``--threads`` threads (1, as the recipe runs are trained here).
Reported per network: the median seconds per step of each order and the median of the
per-pair ratios NCHW / NHWC (the speed-up). The inputs are random: step time does not
depend on pixel values. The CPU model and load averages go into the JSON
(``bench_memory_format.json``, :func:`eenet.reporting.experiment.save_report`).

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        python experiments/bench/bench_memory_format.py       # nothing else running
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from eenet.config import compose_config
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.runs import build_network

EXPERIMENTS = ("cifar10_recipe/resnet20", "cifar10_recipe/resnet20_sdn", "cifar10_recipe/resnet8")


def make_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, nhwc: bool,
              autocast: torch.dtype | None = None):
    """One training step of ``net`` (a copy), in NHWC order when ``nhwc``; forward and loss
    under CPU autocast to ``autocast`` when given (what ``trainer.precision=bf16-mixed``
    does; the loss takes float32 logits, as eenet's EarlyExitModule gives it)."""
    net = copy.deepcopy(net).train()
    if nhwc:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)

    def step() -> float:
        start = time.perf_counter()
        inp = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = net(inp).logits
        loss = sum(torch.nn.functional.cross_entropy(z.float(), y) for z in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def compare(script: str, description: str, variants: dict[str, dict], labels: tuple[str, str],
            extra: dict | None = None) -> None:
    """Time the two ``variants`` (``make_step`` keywords, the baseline first) on each network of
    ``--experiments``, alternating step by step; print the table and save the JSON beside
    ``script`` (:func:`eenet.reporting.experiment.save_report`, with ``extra`` in it)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    load_before = os.getloadavg()
    (base, other), rows, results = variants, [], {}
    for exp in args.experiments:
        cfg = compose_config([f"experiment={exp}"], output_dir="unused")
        net = build_network(cfg, (3, 32, 32))
        steps = {k: make_step(net, x, y, **kw) for k, kw in variants.items()}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.steps):
            for k, step in steps.items():
                times[k].append(step())
        ratios = [a / b for a, b in zip(times[base], times[other])]
        med = {k: statistics.median(v) for k, v in times.items()}
        results[exp] = {"exits": net.num_exits, "seconds_per_step": times, "median_s": med,
                        "speedup_median_of_pairs": statistics.median(ratios)}
        rows.append([exp, net.num_exits, f"{med[base]:.3f}", f"{med[other]:.3f}",
                     f"{statistics.median(ratios):.2f}"])
        print(f"{exp}: {labels[0]} {med[base]:.3f} s, {labels[1]} {med[other]:.3f} s", flush=True)
    table = markdown_table(["experiment", "exits", f"{labels[0]} s/step (median)",
                            f"{labels[1]} s/step (median)",
                            f"speed-up {labels[0]}/{labels[1]} (median of pairs)"], rows)
    print(f"\nTraining step, batch {args.batch}, {args.threads} thread(s), "
          f"{args.steps} alternating pairs after {args.warmup} warm-up\n")
    print(table)
    path = save_report(script, {"settings": vars(args), **(extra or {}), "results": results,
                                "table": table, "load_average_before": load_before,
                                "load_average_after": os.getloadavg()}, seeds=[0])
    print(f"saved {path}")


def main() -> None:
    compare(__file__, __doc__.splitlines()[0],
            {"nchw": {"nhwc": False}, "nhwc": {"nhwc": True}}, ("NCHW", "NHWC"))


if __name__ == "__main__":
    main()
