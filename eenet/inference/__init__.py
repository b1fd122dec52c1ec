"""Inference: the dynamic early-exit engine, per-exit latency, BatchNorm folding."""

from eenet.inference.engine import DynamicEngine, DynamicOutput
from eenet.inference.fold import fold_batchnorm
from eenet.inference.latency import exit_latency_table, run_to_exit

__all__ = ["DynamicEngine", "DynamicOutput", "exit_latency_table", "fold_batchnorm", "run_to_exit"]
