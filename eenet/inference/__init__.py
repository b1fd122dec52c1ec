"""Inference: the dynamic early-exit engine, threshold calibration on val, per-exit latency,
BatchNorm folding."""

from eenet.inference.anytime import anytime_view, step_auc
from eenet.inference.calibration import (CachedExits, CalibrationResult, Calibrator,
                                         OperatingPoint, cache_exit_outputs, paired_drop,
                                         pareto_indices)
from eenet.inference.engine import DynamicEngine, DynamicOutput
from eenet.inference.fold import fold_batchnorm
from eenet.inference.latency import exit_latency_table, run_to_exit

__all__ = ["anytime_view", "step_auc", "CachedExits", "CalibrationResult", "Calibrator", "DynamicEngine", "DynamicOutput",
           "OperatingPoint", "cache_exit_outputs", "exit_latency_table", "fold_batchnorm", "paired_drop", "pareto_indices",
           "run_to_exit"]
