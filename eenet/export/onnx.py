"""An early-exit network as ONNX segments plus a JSON manifest (:func:`export_segments`).

The command ``eenet-export`` (:mod:`eenet.cli.export`, job :mod:`eenet.jobs.export`)::

    eenet-export run=RUN_DIR eval=RUN_DIR/eval/<time>/results.json out=DIR
    eenet-export run=RUN_DIR policy=max_prob thresholds=[0.9,0.8] out=DIR

The network is cut where :meth:`EarlyExitNetwork.segments` cuts it, so that a
runner can stop per sample exactly as the PyTorch dynamic engine
(:mod:`eenet.inference.engine`) does. For N early exits (exits 0..N-1, the
final exit N), the output folder holds::

    segment_0.onnx   stem + stages up to exit 0's stage  x (B, C, H, W) -> features
    exit_0.onnx      exit 0's head                        features -> logits (B, K), conf_logit (B,)
    segment_j.onnx   the stages after exit j-1 up to exit j
    exit_j.onnx      exit j's head
    segment_N.onnx   the remaining stages
    final.onnx       the final exit, the backbone's head  features -> logits (B, K)
    manifest.json    what to run in which order, the policy, costs, preprocessing
    onnx_runner.py   a copy of :mod:`eenet.export.onnx_runner` (numpy + onnxruntime only)

The last segment and the final exit are separate files, so every piece is
"segment, then head" and the only special case is that the final head releases
every sample (h_N = 1, so it has no confidence output). Every file has a
dynamic batch axis (axis 0) and is exported in eval mode (BatchNorm uses its
running statistics). Each piece is checked against PyTorch with onnxruntime
after export. Every file is written atomically (:func:`eenet.io.atomic_write`):
a symlink already at a file's place is replaced, never written through.

``manifest.json`` (``format: eenet-onnx-segments``, ``format_version: 2``)::

    eenet_version, opset, input_size [C, H, W] (float32, NCHW),
    input_range: [lo, hi] of the raw values the model was trained on, before
          normalisation (e.g. [0, 1] for images), or null when not given;
          the runner's ``preprocess`` refuses values outside it
    num_classes, num_exits (N + 1: the final exit counts), exit_stages,
    pieces: [{exit, segment, head, outputs}, ...]        in running order
    policy: {name, thresholds: one per early exit, in the user's units
             (eenet.policies: leave when score > t; "inf", never leave here, and
             "-inf" as strings since JSON has no infinity), rule}
    cost: the eenet.cost table {backbone_macs, input_size, convention, exits:
          [{name, stage, head_macs, macs, cost_fraction}]}; MACs as counted by
          fvcore (one fused multiply-add = one flop), exit heads included
    preprocessing: {mean, std, rule} or null
    runner: "onnx_runner.py"

Format 2 (this eenet) orients the entropy policy like the others: its score is
-H and a sample leaves when -H > t (format 1: when H < t, so ``inf`` meant
"always leave"); it adds ``input_range``. The runner refuses a format-1
manifest with entropy thresholds and reads the others as before.

The exporter is PyTorch's TorchScript-based one (``dynamo=False``): the
torch.export-based exporter needs ``onnxscript``, which eenet does not require.
"""

from __future__ import annotations

import inspect
import io
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

import eenet
from eenet.cost import CostTable, exit_cost_table
from eenet.errors import EENetError
from eenet.io import atomic_write, atomic_write_text, json_float
from eenet.models.early_exit import EarlyExitNetwork
from eenet.policies import ExitPolicy

MANIFEST = "manifest.json"
FORMAT = "eenet-onnx-segments"
FORMAT_VERSION = 2  # 2: entropy thresholds are -H units (leave when -H > t), input_range
RULES = {
    "confidence": "leave at exit i when sigmoid(conf_logit_i) > t_i",
    "max_prob": "leave at exit i when max_k softmax(logits_i)[k] > t_i",
    "entropy": "leave at exit i when -H(softmax(logits_i)) > t_i, i.e. its entropy H (nats) < -t_i",
    "patience": "leave at exit i when exits i-t_i+1..i all predict the same class",
}


class _FinalExit(nn.Module):
    """The final exit's logits, as :meth:`EarlyExitNetwork.final_exit` computes them."""

    def __init__(self, net: EarlyExitNetwork):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.final_exit(x)[0]


def _export(module: nn.Module, x: torch.Tensor, path: Path, input_name: str,
            output_names: Sequence[str], opset: int) -> None:
    """Export one piece to ``path`` atomically (a symlink there is replaced, not followed)."""
    extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    axes = {name: {0: "batch"} for name in (input_name, *output_names)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(module, (x,), buffer, input_names=[input_name],
                          output_names=list(output_names), dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, **extra)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _check(path: Path, x: torch.Tensor, expected: Sequence[torch.Tensor]) -> None:
    """Run one exported piece with onnxruntime and compare it with PyTorch's outputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    for g, e in zip(got, expected):
        e = e.numpy()
        if g.shape != e.shape or not np.allclose(g, e, rtol=1e-3, atol=1e-4):
            diff = np.abs(g - e).max() if g.shape == e.shape else f"shape {g.shape} != {e.shape}"
            raise RuntimeError(f"{path.name} differs from PyTorch after export: {diff}")


def export_segments(net: EarlyExitNetwork, input_size: Sequence[int], out_dir: str | Path,
                    policy: ExitPolicy, cost_table: CostTable | None = None, opset: int = 17,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    check: bool = True, input_range: Sequence[float] | None = None) -> Path:
    """Write the ONNX pieces of ``net`` and ``manifest.json`` into ``out_dir``; return the manifest.

    Args:
        net: the early-exit network (put in eval mode for the export, then restored).
        input_size: ``(C, H, W)`` of one input.
        out_dir: output folder, created if needed.
        policy: exit policy and thresholds written into the manifest.
        cost_table: per-exit MACs (traced with fvcore when not given).
        opset: ONNX opset.
        mean, std: per-channel normalisation of the inputs, recorded when given.
        check: run every piece with onnxruntime and compare it with PyTorch.
        input_range: ``(lo, hi)``, the range of the data set's raw values before
            normalisation (``(0, 1)`` for images scaled from 0..255); recorded so that
            the runner refuses inputs of another scale. ``None``: not recorded.
    """
    n_early = net.num_exits - 1
    policy.threshold_vector(n_early)  # checks the number of thresholds
    t = policy.thresholds
    thresholds = list(t) if isinstance(t, list) else [t] * n_early
    input_size = tuple(int(v) for v in input_size)
    if (mean is None) != (std is None):
        raise EENetError("give both mean and std for the preprocessing, or neither")
    if input_range is not None:
        try:
            lo, hi = (float(v) for v in input_range)
        except (TypeError, ValueError):
            raise EENetError(f"input_range must be two numbers (lo, hi), got {input_range!r}") \
                from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise EENetError(f"input_range must be finite with lo < hi, got {input_range!r}")
        input_range = [lo, hi]
    if not isinstance(net, EarlyExitNetwork):
        raise EENetError(f"ONNX segment export takes a staged early-exit network; a "
                         f"{type(net).__name__} (a model cut from a traced graph, several live "
                         "values per segment) is not exported yet: run it with the DynamicEngine")
    if getattr(net, "carry_exit", None) is not None:
        raise EENetError("this network carries an early exit's features to the final exit "
                         "(mitigation 'concat'), which the segment export does not support; "
                         "use mitigation 'trecx' (nothing is carried) or none")
    cost = cost_table if cost_table is not None else exit_cost_table(net, input_size)
    if len(cost.exits) != net.num_exits:
        raise EENetError(f"the cost table has {len(cost.exits)} exits, the network "
                         f"{net.num_exits}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    pieces = []
    was_training = net.training
    net.eval()
    try:
        x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
        net.check_input(x)
        with torch.no_grad():
            for j, (modules, exit_block) in enumerate(net.segments()):
                final = exit_block is None
                # wrappers in eval mode: the exporter restores a wrapper's mode afterwards,
                # which would switch the wrapped network's dropout and BatchNorm to training
                segment = nn.Sequential(*modules).eval()
                head = _FinalExit(net).eval() if final else exit_block
                names = {"exit": j, "segment": f"segment_{j}.onnx",
                         "head": "final.onnx" if final else f"exit_{j}.onnx",
                         "outputs": ["logits"] if final else ["logits", "conf_logit"]}
                y = segment(x)
                _export(segment, x, out / names["segment"], "x", ["features"], opset)
                _export(head, y, out / names["head"], "features", names["outputs"], opset)
                if check:
                    head_out = head(y)
                    _check(out / names["segment"], x, [y])
                    _check(out / names["head"], y, [head_out] if final else list(head_out))
                pieces.append(names)
                x = y
    finally:
        net.train(was_training)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "eenet_version": eenet.__version__,
        "opset": opset,
        "input_size": list(input_size),
        "input_range": input_range,
        "num_classes": net.num_classes,
        "num_exits": net.num_exits,
        "exit_stages": net.exit_stage_indices(),
        "pieces": pieces,
        "policy": {"name": policy.name, "thresholds": [json_float(float(v)) for v in thresholds],
                   "rule": RULES.get(policy.name, "")},
        "cost": cost.to_dict(),
        "preprocessing": None if mean is None else {
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "rule": "x = (raw - mean) / std per channel, raw values in input_range"
                    + (" (uint8 images / 255)" if input_range == [0.0, 1.0] else "")},
        "runner": "onnx_runner.py",
    }
    runner = Path(__file__).with_name("onnx_runner.py").read_bytes()
    atomic_write(out / "onnx_runner.py", lambda f: f.write(runner))
    path = out / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path
