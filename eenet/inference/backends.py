"""Engine backends: the same dynamic early exit, with the segments run by PyTorch, TorchScript or
onnxruntime.

Every backend gives the :class:`eenet.inference.engine.DynamicEngine` a different list of
:class:`eenet.models.early_exit.Step` s (each segment's body and each exit's head over the live
values); the walk, the policy, the decisions and the bookkeeping of remaining samples stay the
engine's own, so the backends can differ only in the logits their steps compute:

- ``eager``: ``net.walk()`` as it is (today's engine).
- ``compiled``: every body and head traced with ``torch.jit.trace`` on the live values and frozen
  (``torch.jit.freeze``, which also folds each BatchNorm into the convolution before it). Chosen
  by measurement on this 2-core CPU (``experiments/bench/bench_backends.py`` holds the figures):
  at batch 1 the per-operation dispatch of eager PyTorch dominates and a frozen TorchScript graph
  removes most of it; ``torch.compile(dynamic=True)`` compiles with a C++ toolchain for tens of
  seconds per run and was not faster at batch 1 here. Frozen graphs round differently from eager
  (folded BatchNorm), so exits equal eager's except for a score within that rounding of its
  threshold (tests place thresholds away from the scores). Traced modules are cached in memory
  per ``cache_dir`` and weights, not on disk: loading TorchScript runs code from the file, and
  nothing in a run folder is run as code (``eenet.runs``).
- ``onnxruntime``: the network exported with :func:`eenet.export.onnx.export_segments` into
  ``cache_dir`` (re-exported only when the weights changed: a digest of the state dict is kept
  beside the manifest), the pieces opened by :class:`eenet.export.onnx_runner.OnnxEarlyExitRunner`
  (which checks the manifest), each piece wrapped as a step (numpy views of the torch tensors,
  no copy). Staged networks without carried features only, as the export.

``create_engine(net, policy, cost, backend=..., cache_dir=...)`` builds one; its
``build_seconds`` (trace/export) and ``first_call_seconds`` (the first batch, which warms every
lazy initialisation) are reported apart from the steady-state times.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from eenet.cost import CostTable
from eenet.errors import EENetError
from eenet.inference.engine import DynamicEngine, DynamicOutput
from eenet.models.early_exit import EarlyExitNetwork, Step
from eenet.policies import ExitPolicy

BACKENDS = ("eager", "compiled", "onnxruntime")
DIGEST_FILE = "eenet_backend_key.json"

_COMPILED: dict[tuple, list[Step]] = {}  # (cache_dir, weights digest, input size) -> steps


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 of the state dict (names, shapes, dtypes and bytes): the key of a cached build."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Traced(torch.nn.Module):
    """A step's body or head as a module, for tracing (live values are a tuple of tensors)."""

    def __init__(self, fn, owner: torch.nn.Module):
        super().__init__()
        self.fn = fn
        self.owner = owner  # the network: its parameters become the traced module's

    def forward(self, *live):
        return self.fn(tuple(live))


def _flat_head(out: tuple) -> tuple:
    logits, z, live = out
    return (logits, z, *live)


def compiled_steps(net: EarlyExitNetwork, input_size: Sequence[int]) -> list[Step]:
    """``net.walk()`` with every body and head traced (batch 2, any batch size afterwards) and
    frozen; the network must be in eval mode."""
    steps = net.walk()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    live: tuple = (x,)
    out: list[Step] = []
    with torch.no_grad():
        for step in steps:
            body = torch.jit.freeze(torch.jit.trace(_Traced(step.body, net).eval(), live,
                                                    check_trace=False))
            live = step.body(live)
            head_fn = (lambda h: (lambda v: _flat_head(h(v))))(step.head)
            head = torch.jit.freeze(torch.jit.trace(_Traced(head_fn, net).eval(), live,
                                                    check_trace=False))
            _, _, live = step.head(live)
            out.append(Step(_body_of(body), _head_of(head), step.skippable))
    return out


def _body_of(traced) -> callable:
    def body(live: tuple) -> tuple:
        y = traced(*live)
        return y if isinstance(y, tuple) else (y,)
    return body


def _head_of(traced) -> callable:
    def head(live: tuple) -> tuple:
        logits, z, *rest = traced(*live)
        return logits, z, tuple(rest)
    return head


def onnx_steps(net: EarlyExitNetwork, input_size: Sequence[int], cache_dir: str | Path,
               policy: ExitPolicy, threads: int | None = None) -> list[Step]:
    """The network exported to ONNX in ``cache_dir`` (once per weights) and run by onnxruntime,
    one step per exported segment and head."""
    from eenet.export.onnx import export_segments
    from eenet.export.onnx_runner import OnnxEarlyExitRunner

    folder = Path(cache_dir)
    key = {"weights_sha256": weights_digest(net), "input_size": [int(v) for v in input_size]}
    key_path = folder / DIGEST_FILE
    try:
        fresh = json.loads(key_path.read_text()) == key and (folder / "manifest.json").is_file()
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        export_segments(net, input_size, folder, policy, cost_table=None, check=False)
        key_path.write_text(json.dumps(key) + "\n")
    runner = OnnxEarlyExitRunner(folder, threads=threads)
    steps = net.walk()
    if len(runner.pieces) != len(steps):
        raise EENetError(f"{folder}: {len(runner.pieces)} exported pieces for {len(steps)} steps")
    out = []
    for (segment, head), step in zip(runner.pieces, steps):
        out.append(Step(_ort_body(segment), _ort_head(head), step.skippable))
    return out


def _ort_body(session) -> callable:
    name = session.get_inputs()[0].name

    def body(live: tuple) -> tuple:
        x = live[0].contiguous().numpy()
        return (torch.from_numpy(session.run(None, {name: x})[0]),)
    return body


def _ort_head(session) -> callable:
    name = session.get_inputs()[0].name
    final = len(session.get_outputs()) == 1

    def head(live: tuple) -> tuple:
        outs = session.run(None, {name: live[0].contiguous().numpy()})
        logits = torch.from_numpy(outs[0])
        z = (torch.full(logits.shape[:1], float("inf")) if final
             else torch.from_numpy(np.asarray(outs[1]).reshape(-1)))
        return logits, z, live
    return head


class BackendEngine(DynamicEngine):
    """A :class:`DynamicEngine` whose steps a backend runs.

    Attributes:
        backend: ``eager``, ``compiled`` or ``onnxruntime``.
        build_seconds: time spent tracing / exporting / opening sessions (0 when cached).
        first_call_seconds: time of the first call (None before it).
    """

    def __init__(self, net: EarlyExitNetwork, policy: ExitPolicy,
                 cost_fractions: CostTable | Sequence[float] | None, steps: list[Step],
                 backend: str, build_seconds: float, keep_logits: bool = False):
        super().__init__(net, policy, cost_fractions, keep_logits=keep_logits)
        self._steps = steps
        self.backend = backend
        self.build_seconds = build_seconds
        self.first_call_seconds: float | None = None

    @property
    def steps(self) -> list[Step]:
        """The steps this backend runs (for latency tables)."""
        return self._steps

    def __call__(self, x: torch.Tensor) -> DynamicOutput:
        if self.first_call_seconds is not None:
            return super().__call__(x)
        t0 = time.perf_counter()
        out = super().__call__(x)
        self.first_call_seconds = time.perf_counter() - t0
        return out


def create_engine(net: EarlyExitNetwork, policy: ExitPolicy,
                  cost_fractions: CostTable | Sequence[float] | None = None,
                  backend: str = "eager", cache_dir: str | Path | None = None,
                  input_size: Sequence[int] | None = None, threads: int | None = None,
                  keep_logits: bool = False) -> BackendEngine:
    """A dynamic engine run by ``backend`` (module docstring); ``net`` must be in eval mode.

    Args:
        cache_dir: where the build is kept (the onnxruntime export; the in-memory key of the
            traced modules); required for ``onnxruntime``, e.g. ``RUN/engine_cache``.
        input_size: (C, H, W), default ``net.input_size``.
        threads: onnxruntime's intra-op threads (default: its own).
    """
    if backend not in BACKENDS:
        raise EENetError(f"unknown engine backend '{backend}'; accepted: {', '.join(BACKENDS)}")
    if net.training:
        raise EENetError("engine backends are built in eval mode: call net.eval() first")
    size = tuple(int(v) for v in (input_size or net.input_size))
    t0 = time.perf_counter()
    if backend == "eager":
        steps = net.walk()
    elif backend == "compiled":
        key = (str(cache_dir), weights_digest(net), size)
        if key not in _COMPILED:
            _COMPILED[key] = compiled_steps(net, size)
        steps = _COMPILED[key]
    else:
        if cache_dir is None:
            raise EENetError("backend onnxruntime needs cache_dir (a folder for the export, "
                             "e.g. RUN/engine_cache/onnx)")
        steps = onnx_steps(net, size, cache_dir, policy, threads)
    build = time.perf_counter() - t0
    return BackendEngine(net, policy, cost_fractions, steps, backend, build, keep_logits)
