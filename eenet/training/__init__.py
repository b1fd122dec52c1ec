"""Lightning training layer: the LightningModule and its torchmetrics."""

from eenet.training.metrics import ExitMetrics
from eenet.training.module import EarlyExitModule

__all__ = ["EarlyExitModule", "ExitMetrics"]
