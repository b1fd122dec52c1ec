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

import importlib.util
from pathlib import Path

import torch

# bench_memory_format.py, beside this script, loaded by its path (whatever the working folder):
# the same networks, training step and comparison
_spec = importlib.util.spec_from_file_location(
    "bench_memory_format", Path(__file__).resolve().with_name("bench_memory_format.py"))
_memory_format = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memory_format)


def cpu_bfloat16() -> dict:
    """``torch.cpu``'s checks of the CPU's bfloat16 support (private: None where missing)."""
    checks = {"amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {k: (bool(getattr(torch.cpu, f)()) if hasattr(torch.cpu, f) else None)
            for k, f in checks.items()}


def main() -> None:
    support = cpu_bfloat16()
    print(f"CPU bfloat16 support: {support}")
    _memory_format.compare(__file__, __doc__.splitlines()[0],
                           {"float32": {"nhwc": True},
                            "bf16_mixed": {"nhwc": True, "autocast": torch.bfloat16}},
                           ("float32", "bf16-mixed"), extra={"cpu_bfloat16": support})


if __name__ == "__main__":
    main()
