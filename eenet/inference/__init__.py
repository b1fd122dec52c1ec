"""Inference: the dynamic early-exit engine and its backends, per-exit and tail latency,
BatchNorm folding."""

from eenet.inference.backends import BACKENDS, BackendEngine, create_engine
from eenet.inference.engine import DynamicEngine, DynamicOutput
from eenet.inference.fold import fold_batchnorm
from eenet.inference.latency import (TAIL_KEYS, LatencyCostTable, exit_latency_table,
                                     latency_cost_table, run_to_exit, tail_latency)

__all__ = ["BACKENDS", "BackendEngine", "DynamicEngine", "DynamicOutput", "LatencyCostTable",
           "TAIL_KEYS", "create_engine", "exit_latency_table", "fold_batchnorm",
           "latency_cost_table", "run_to_exit", "tail_latency"]
