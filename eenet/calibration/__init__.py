"""Threshold search on cached validation outputs: calibration for a budget or a tolerance,
its optimism correction, thresholds with a finite-sample guarantee on a risk, paired
statistics, Pareto fronts and the anytime view."""

from eenet.calibration.anytime import anytime_view, step_auc
from eenet.calibration.cache import CachedExits, cache_exit_outputs
from eenet.calibration.guarantee import GuaranteeResult, certify, certify_with, check_guarantee_options
from eenet.calibration.risk import RISKS, exit_losses
from eenet.calibration.search import CalibrationResult, Calibrator, OperatingPoint
from eenet.calibration.stats import paired_drop, pareto_indices
from eenet.calibration.temperature import (TemperatureFit, apply_temperatures, exit_calibration_errors,
                                           fit_temperatures, temperature_report)

__all__ = ["CachedExits", "CalibrationResult", "Calibrator", "OperatingPoint", "anytime_view",
           "cache_exit_outputs", "paired_drop", "pareto_indices", "step_auc"]
__all__ += ["TemperatureFit", "apply_temperatures", "exit_calibration_errors", "fit_temperatures",
            "temperature_report"]
__all__ += ["GuaranteeResult", "RISKS", "certify", "certify_with", "check_guarantee_options", "exit_losses"]
