"""Training step time in bfloat16 mixed precision against float32, on a CPU.

``trainer.precision=bf16-mixed`` runs eenet-train's training steps under autocast (matmuls and
convolutions in bfloat16, float32 weights and optimizer); ``trainer.precision=auto`` takes it
where the CPU has AMX tiles (:func:`eenet.jobs.train.native_bfloat16`). This measures what it
buys for the CIFAR-10 recipe's networks in the recipe's memory order (channels-last): each
network is built from its experiment config (``--experiments``, default the recipe's resnet20,
resnet20 with SDN's six exits, and ResNet-8), and one training step (forward, cross-entropy on
every exit, backward, SGD with Nesterov momentum;
``bench_memory_format.make_step``) on a batch of ``--batch`` (256) 3x32x32 inputs is timed in
float32 and in bfloat16 autocast, alternating step by step so that both see the same load,
``--steps`` timed steps after ``--warmup`` untimed ones, ``--threads`` threads (1, as the
recipe runs are trained here). Reported per network: the median seconds per step of each and
the median of the per-pair ratios float32 / bfloat16 (the speed-up). On a CPU without native
bfloat16 the ratio may be below 1: the JSON records the CPU and whether it has AMX tiles and
AVX512-BF16 (``torch.cpu``'s own checks).

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        python experiments/bench/bench_precision.py       # nothing else running
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
from pathlib import Path

import torch

from eenet.config import compose_config
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.runs import build_network

# bench_memory_format.py, beside this script, loaded by its path (whatever the working folder):
# the same networks and the same training step
_spec = importlib.util.spec_from_file_location(
    "bench_memory_format", Path(__file__).resolve().with_name("bench_memory_format.py"))
_memory_format = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memory_format)
EXPERIMENTS, make_step = _memory_format.EXPERIMENTS, _memory_format.make_step


def cpu_bfloat16() -> dict:
    """``torch.cpu``'s checks of the CPU's bfloat16 support (private: None where missing)."""
    checks = {"amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {k: (bool(getattr(torch.cpu, f)()) if hasattr(torch.cpu, f) else None)
            for k, f in checks.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    rows, results = [], {}
    for exp in args.experiments:
        cfg = compose_config([f"experiment={exp}"], output_dir="unused")
        net = build_network(cfg, (3, 32, 32))
        steps = {"float32": make_step(net, x, y, True),
                 "bf16_mixed": make_step(net, x, y, True, autocast=torch.bfloat16)}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.steps):
            for k, step in steps.items():
                times[k].append(step())
        ratios = [a / b for a, b in zip(times["float32"], times["bf16_mixed"])]
        med = {k: statistics.median(v) for k, v in times.items()}
        results[exp] = {"exits": net.num_exits, "seconds_per_step": times, "median_s": med,
                        "speedup_median_of_pairs": statistics.median(ratios)}
        rows.append([exp, net.num_exits, f"{med['float32']:.3f}", f"{med['bf16_mixed']:.3f}",
                     f"{statistics.median(ratios):.2f}"])
        print(f"{exp}: float32 {med['float32']:.3f} s, bf16-mixed {med['bf16_mixed']:.3f} s",
              flush=True)
    table = markdown_table(["experiment", "exits", "float32 s/step (median)",
                            "bf16-mixed s/step (median)",
                            "speed-up float32/bf16 (median of pairs)"], rows)
    support = cpu_bfloat16()
    print(f"\nTraining step, channels-last, batch {args.batch}, {args.threads} thread(s), "
          f"{args.steps} alternating pairs after {args.warmup} warm-up; CPU bfloat16: {support}\n")
    print(table)
    path = save_report(__file__, {"settings": vars(args), "cpu_bfloat16": support,
                                  "results": results, "table": table,
                                  "load_average_before": load_before,
                                  "load_average_after": os.getloadavg()}, seeds=[0])
    print(f"saved {path}")


if __name__ == "__main__":
    main()
