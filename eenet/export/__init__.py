"""Export: an early-exit network as ONNX segments that a runner can stop per sample.

``onnx.py`` writes the pieces and the manifest; ``onnx_runner.py`` runs them with
numpy and onnxruntime only (it is copied into every export and never imports eenet).
"""

from eenet.export.onnx import export_segments

__all__ = ["export_segments"]
