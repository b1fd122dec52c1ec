"""Engine backends: the same dynamic early exit, with the segments run by PyTorch, TorchScript or
onnxruntime.

Every backend gives the :class:`eenet.inference.engine.DynamicEngine` a different list of
:class:`eenet.models.early_exit.Step` s (each segment's body and each exit's head over the live
values); the walk, the policy, the decisions and the bookkeeping of remaining samples stay the
engine's own, so the backends can differ only in the logits their steps compute:

- ``eager``: ``net.walk()`` as it is (today's engine).
- ``compiled``: every body and head traced with ``torch.jit.trace`` on the live values and frozen
  (``torch.jit.freeze``, which also folds each BatchNorm into the convolution before it). At
  batch 1 the per-operation dispatch of eager PyTorch dominates and a frozen TorchScript graph
  removes much of it. ``torch.compile(dynamic=True)`` was measured against it once on this
  2-core AMD EPYC, a busy one (load average 8; the plain mnist_budget resnet20, 1 thread, 300
  MNIST test images one by one, median of 5 interleaved passes): its first calls took 32.6 s
  (a C++ toolchain compiles the kernels; tracing and freezing 0.3 s), and it ran 11.3 ms per
  image against 9.3 for trace + freeze (eager 14.2), so trace + freeze was kept. Measured again
  on the idle machine (2026-11-30, 2 threads, the mnist_budget network's step to exit 0, 400
  MNIST test images one by one, median of 5): ``torch.compile(dynamic=False)`` with inductor's
  ``freezing`` 0.348 ms per image (5.6 s to compile), trace + freeze 0.218, eager 0.433;
  ``experiments/bench/bench_backends.py`` measures the backends on an idle machine. Frozen
  graphs round differently from eager
  (folded BatchNorm), so exits equal eager's except for a score within that rounding of its
  threshold (tests place thresholds away from the scores). Traced modules are cached in memory
  per ``cache_dir`` and weights, not on disk: loading TorchScript runs code from the file, and
  nothing in a run folder is run as code (``eenet.runs``). A single sample runs on one
  PyTorch thread (:meth:`BackendEngine._one_thread`).
- ``onnxruntime``: the network exported with :func:`eenet.export.onnx.export_segments` into
  ``cache_dir`` (re-exported only when the weights changed: a digest of the state dict is kept
  beside the manifest), the pieces opened by :class:`eenet.export.onnx_runner.OnnxEarlyExitRunner`
  (which checks the manifest), each piece wrapped as a step (numpy views of the torch tensors,
  no copy). The export also holds each piece's segment and head as one graph
  (``export_segments(fused=True)``), which the engine runs when the head runs: one call
  instead of two. Every graph is opened twice, with the engine's threads for batches and
  with one thread for a single sample (:class:`_Pair`), and idle threads do not spin
  (:data:`ORT_SPINNING`). A single sample's live values stay numpy arrays from piece to piece
  (:class:`_NumpyPiece`, :meth:`BackendEngine._run_one`); PyTorch sees only each exit's logits,
  for the policy's score. An ONNX file is data to onnxruntime (no Python runs from it), and a cached export
  is checked against the network on a random batch before use and exported again when it
  differs. Several live values are carried by the names the manifest (format 3) gives them:
  a T-RecX ``concat`` exit's features, the skip connections of a graph backbone that cross a
  cut (:func:`_ort_plan`).

``create_engine(net, policy, cost, backend=..., cache_dir=...)`` builds one; its
``build_seconds`` (trace/export) and ``first_call_seconds`` (the first batch, which warms every
lazy initialisation) are reported apart from the steady-state times.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from eenet.cost import CostTable
from eenet.errors import EENetError
from eenet.io import atomic_write_text
from eenet.inference.engine import DynamicEngine, DynamicOutput
from eenet.models.early_exit import EarlyExitNetwork, Step
from eenet.policies import ExitPolicy

BACKENDS = ("eager", "compiled", "onnxruntime")
#: whether onnxruntime's idle threads spin between runs (its default) in the engine backend.
#: Off: between onnxruntime's runs the engine's PyTorch threads index the remaining samples,
#: and spinning threads (one pool per session) took the cores from them. Measured on the
#: 2-core AMD EPYC, mnist_budget resnet20 with 2 exits, 2,560 MNIST test images at batch 256,
#: 2 threads, median of 5 passes in one process: 0.249 ms per image spinning, 0.106 not.
ORT_SPINNING = False
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
    """``net.walk()`` with every body, head, and body followed by head (``Step.fused``: one
    graph, one call) traced (batch 2, any batch size afterwards) and frozen; the network must
    be in eval mode."""
    steps = net.walk()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    live: tuple = (x,)
    out: list[Step] = []
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit's deprecation notes, and the tracer's notes on Python numbers read from
        # shapes (the number of classes, fixed per network); the tests compare every backend
        # with eager on other batch sizes and inputs than the trace's
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for step in steps:
            before = live
            body = torch.jit.freeze(torch.jit.trace(_Traced(step.body, net).eval(), live,
                                                    check_trace=False))
            live = step.body(live)
            head_fn = (lambda h: (lambda v: _flat_head(h(v))))(step.head)
            head = torch.jit.freeze(torch.jit.trace(_Traced(head_fn, net).eval(), live,
                                                    check_trace=False))
            fused_fn = (lambda s: (lambda v: _flat_head(s.head(s.body(v)))))(step)
            fused = torch.jit.freeze(torch.jit.trace(_Traced(fused_fn, net).eval(), before,
                                                     check_trace=False))
            _, _, live = step.head(live)
            out.append(Step(_body_of(body), _head_of(head), step.skippable, _head_of(fused)))
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
               policy: ExitPolicy, threads: int | None = None) -> "OnnxSteps":
    """The network exported to ONNX in ``cache_dir`` (once per weights) and run by onnxruntime,
    one step per exported segment and head, carrying the live values by their manifest names
    (:func:`_ort_plan`). A cached export is checked against the network before it is used
    (:func:`_matches`) and exported again when it does not match (edited, or a stale key)."""
    from eenet.export.onnx import export_segments

    folder = Path(cache_dir)
    key = {"weights_sha256": weights_digest(net), "input_size": [int(v) for v in input_size],
           "fused": True}
    key_path = folder / DIGEST_FILE
    try:
        fresh = json.loads(key_path.read_text()) == key and (folder / "manifest.json").is_file()
    except (OSError, ValueError):
        fresh = False
    if fresh:
        built = _open_export(net, folder, threads, quiet=True)
        if built is not None and _matches(net, built.steps, input_size):
            return built
    export_segments(net, input_size, folder, policy, cost_table=None, check=False, fused=True)
    atomic_write_text(key_path, json.dumps(key) + "\n")
    built = _open_export(net, folder, threads, quiet=False)
    if not _matches(net, built.steps, input_size):
        raise EENetError(f"{folder}: the onnxruntime pieces just exported differ from PyTorch "
                         f"beyond the exporter's own check (rtol {RTOL}, atol {ATOL})")
    return built


#: the exporter's tolerance for a piece against PyTorch (eenet.export.onnx._check)
RTOL, ATOL = 1e-3, 1e-4


def _matches(net: EarlyExitNetwork, steps: list[Step], input_size: Sequence[int]) -> bool:
    """Every exit's logits of ``steps`` on a fixed random batch of 3 against ``net.walk()``'s."""
    x = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        live_a, live_b = (x,), (x,)
        for a, b in zip(net.walk(), steps):
            live_a, live_b = a.body(live_a), b.body(live_b)
            (la, _, live_a), (lb, _, live_b) = a.head(live_a), b.head(live_b)
            if la.shape != lb.shape or not torch.allclose(lb, la, rtol=RTOL, atol=ATOL):
                return False
    return True


def _open_export(net: EarlyExitNetwork, folder: Path, threads: int | None,
                 quiet: bool) -> "OnnxSteps | None":
    """The steps of the export in ``folder``; None (``quiet``) or one line when it cannot be
    read as this network's export."""
    from eenet.export.onnx_runner import OnnxEarlyExitRunner, RunnerError

    try:
        runner = OnnxEarlyExitRunner(folder, threads=threads, spinning=ORT_SPINNING)
        single = runner if threads == 1 else OnnxEarlyExitRunner(folder, threads=1)
        m = runner.manifest
        problem = None
        if len(runner.pieces) != net.num_exits:
            problem = f"{len(runner.pieces)} exported pieces for {net.num_exits} exits"
        elif m.get("format_version", 0) < 3:
            problem = (f"an export of manifest format {m.get('format_version')}, which names "
                       f"no live values")
    except (RunnerError, OSError, ValueError, KeyError) as exc:
        problem = str(exc)
    except Exception as exc:  # onnxruntime's own errors on a damaged file (InvalidProtobuf, ...)
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem is not None:
        if quiet:
            return None
        raise EENetError(f"the onnxruntime backend's export in {folder} cannot be used: "
                         f"{problem}; remove the folder to export again")
    try:
        fused = [_Pair(runner.open_session(piece["fused"]), single.open_session(piece["fused"]))
                 for piece in m["pieces"]]
    except Exception as exc:  # no entry (an export without fused pieces), a missing or damaged
        # file (RunnerError, onnxruntime's own errors)
        if quiet:
            return None
        raise EENetError(f"the onnxruntime backend's export in {folder} has no usable fused "
                         f"pieces ({type(exc).__name__}: {exc}); remove the folder to export "
                         f"again") from None
    out, order, pieces = [], [m.get("input", "x")], []
    for piece, (segment, head), (segment1, head1), both, step in zip(
            m["pieces"], runner.pieces, single.pieces, fused, net.walk()):
        body, head_fn, fused_fn, order, numpy_piece = _ort_plan(
            piece, _Pair(segment, segment1), _Pair(head, head1), both, order)
        out.append(Step(body, head_fn, step.skippable, fused_fn))
        pieces.append(numpy_piece)
    return OnnxSteps(out, m.get("input", "x"), pieces)


class OnnxSteps(NamedTuple):
    """The onnxruntime backend's build: the engine's steps, and the same pieces over numpy
    values for a single sample (the network's input named ``input``)."""

    steps: list[Step]
    input: str
    numpy_pieces: list[_NumpyPiece]


class _Pair(NamedTuple):
    """One ONNX graph opened twice: with the engine's threads, and with one thread for a
    batch of one sample, where waking and joining worker threads costs more than the
    arithmetic they share (the per-call overhead that dominates at batch size 1)."""

    many: object  # onnxruntime.InferenceSession
    one: object

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        single = next(iter(feeds.values())).shape[0] == 1
        return (self.one if single else self.many).run(names, feeds)


def _ort_plan(piece: dict, segment, head, both, order: list[str]
              ) -> tuple[callable, callable, callable, list]:
    """One exported piece as a step over a tuple of live values whose names are ``order``.

    The tuple's order is this backend's own (the engine only indexes the samples of each
    value): the segment returns ``order`` with the values it computes appended, pruned to
    what its head or a later piece reads (the manifest's ``head_inputs`` and ``live``); the
    head returns the tuple it was given plus the values it adds (``head_live_outputs``), so
    that the next segment receives the same names whether an idle (skippable, adding nothing)
    head ran or not. ``both`` is the piece's fused graph (segment and head, ``fused_<j>.onnx``),
    whose step gives what the head would give after the body, in one onnxruntime call.
    Returns ``(body, head, fused, the names after the head, the piece over numpy values for
    a single sample)``.
    """
    seg_in, seg_out = list(piece["segment_inputs"]), list(piece["segment_outputs"])
    needed = set(piece["head_inputs"]) | set(piece["live"])
    after_body = [n for n in dict.fromkeys([*order, *seg_out]) if n in needed]
    head_in, outputs = list(piece["head_inputs"]), list(piece["outputs"])
    added = list(piece["head_live_outputs"])
    after_head = after_body + [n for n in added if n not in after_body]
    final = len(outputs) == 1
    pos_in = {n: i for i, n in enumerate(order)}

    def body(live: tuple) -> tuple:
        values = dict(zip(order, live))
        got = segment.run(seg_out, {n: _np(live[pos_in[n]]) for n in seg_in})
        values.update((n, torch.from_numpy(v)) for n, v in zip(seg_out, got))
        return tuple(values[n] for n in after_body)

    pos_body = {n: i for i, n in enumerate(after_body)}

    def head_fn(live: tuple) -> tuple:
        outs = head.run([*outputs, *added], {n: _np(live[pos_body[n]]) for n in head_in})
        logits = torch.from_numpy(outs[0])
        z = (torch.full(logits.shape[:1], float("inf")) if final
             else torch.from_numpy(np.asarray(outs[1]).reshape(-1)))
        extra = dict(zip(added, outs[len(outputs):]))
        return logits, z, live + tuple(torch.from_numpy(extra[n]) for n in after_head[len(live):])

    fused_in, fused_out = list(piece["fused_inputs"]), list(piece["fused_outputs"])
    given = fused_out[len(outputs):]  # the values the head adds, then the segment's

    def fused_fn(live: tuple) -> tuple:
        outs = both.run(fused_out, {n: _np(live[pos_in[n]]) for n in fused_in})
        logits = torch.from_numpy(outs[0])
        if final:  # the walk ends here: nothing is carried on
            return logits, torch.full(logits.shape[:1], float("inf")), ()
        z = torch.from_numpy(np.asarray(outs[1]).reshape(-1))
        values = dict(zip(order, live))
        values.update((n, torch.from_numpy(v)) for n, v in zip(given, outs[len(outputs):]))
        return logits, z, tuple(values[n] for n in after_head)

    # the same piece on numpy values by name, for one sample (_NumpyPiece)
    def body_np(values: dict) -> dict:
        got = segment.run(seg_out, {n: values[n] for n in seg_in})
        values = {**values, **dict(zip(seg_out, got))}
        return {n: values[n] for n in after_body}

    def fused_np(values: dict) -> tuple:
        outs = both.run(fused_out, {n: values[n] for n in fused_in})
        if final:
            return outs[0], None, {}
        values = {**values, **dict(zip(given, outs[len(outputs):]))}
        return outs[0], np.asarray(outs[1]).reshape(-1), {n: values[n] for n in after_head}
    return body, head_fn, fused_fn, after_head, _NumpyPiece(body_np, fused_np)


class _NumpyPiece(NamedTuple):
    """An exported piece over numpy values by name (``{name: array}``), the live values of the
    onnxruntime backend's single-sample walk (:meth:`BackendEngine._run_one`): ``body`` (the
    segment alone, for an idle exit) returns the values later pieces read; ``fused`` (segment
    and head in one call) returns ``(logits, confidence logits or None at the final exit,
    values)``."""

    body: callable
    fused: callable


def _np(t: torch.Tensor) -> np.ndarray:
    """A float tensor as the C-contiguous numpy array onnxruntime reads (a view when it can)."""
    return t.contiguous().numpy()


class BackendEngine(DynamicEngine):
    """A :class:`DynamicEngine` whose steps a backend runs.

    Attributes:
        backend: ``eager``, ``compiled`` or ``onnxruntime``.
        build_seconds: time spent tracing / exporting / opening sessions (0 when cached).
        first_call_seconds: time of the first call (None before it).
    """

    def __init__(self, net: EarlyExitNetwork, policy: ExitPolicy,
                 cost_fractions: CostTable | Sequence[float] | None, steps: list[Step],
                 backend: str, build_seconds: float, keep_logits: bool = False,
                 single: OnnxSteps | None = None):
        super().__init__(net, policy, cost_fractions, keep_logits=keep_logits)
        self._steps = steps
        self.backend = backend
        self.build_seconds = build_seconds
        self.first_call_seconds: float | None = None
        #: onnxruntime: the pieces over numpy values that run a single sample (_run_one)
        self._single = single
        #: per exit, the exit index and cost of a single sample that leaves there (cloned)
        self._one_exit = [torch.tensor([j]) for j in range(net.num_exits)]
        self._one_cost = list(self.costs.reshape(-1, 1))

    @property
    def steps(self) -> list[Step]:
        """The steps this backend runs (for latency tables)."""
        return self._steps

    def with_policy(self, policy: ExitPolicy,
                    cost_fractions: CostTable | Sequence[float] | None) -> "BackendEngine":
        """An engine on the same build (its steps and, with onnxruntime, its single-sample
        walk; no new build, the same ``build_seconds``) with another policy: the calibrated
        engine of a plain one, the latency table's engines forced out at one exit. Derive
        engines this way: a ``BackendEngine`` made from ``steps`` alone has no
        single-sample walk."""
        return BackendEngine(self.net, policy, cost_fractions, self._steps, self.backend,
                             self.build_seconds, self.keep_logits, self._single)

    def __call__(self, x: torch.Tensor) -> DynamicOutput:
        if self.first_call_seconds is not None:
            return self._call(x)
        t0 = time.perf_counter()
        out = self._call(x)
        self.first_call_seconds = time.perf_counter() - t0
        return out

    def _call(self, x: torch.Tensor) -> DynamicOutput:
        single = isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1
        if not self._one_thread(single):  # no context at all on the batch-1 hot path
            return super().__call__(x)
        with self._one_torch_thread():
            return super().__call__(x)

    def _run_one(self, x: torch.Tensor) -> DynamicOutput:
        """A single sample. With onnxruntime its live values stay numpy arrays between the
        pieces, and only each exit's logits are seen by PyTorch (zero-copy views) for the
        policy's score: at batch 1 the per-call work around onnxruntime's run (tensor
        conversions, indexing, PyTorch's small operations) was as long as the run itself,
        about 0.1 ms per image on the 2-core AMD EPYC (mnist_budget, exit 0)."""
        if self._single is None or x.device.type != "cpu":
            return super()._run_one(x)
        state = self.policy.initial_state(1, x.device)
        values = {self._single.input: _np(x)}
        pieces = self._single.numpy_pieces
        last = len(pieces) - 1
        for j, piece in enumerate(pieces):
            if j < last and self.skipped[j]:  # an idle exit: segment only
                values = piece.body(values)
                continue
            logits, z, values = piece.fused(values)
            if j == last:
                break
            score, state = self.policy.score_at(j, torch.from_numpy(logits),
                                                torch.from_numpy(z), state)
            if score.item() > self.thresholds[j]:
                break
        return DynamicOutput(pred=torch.from_numpy(logits.argmax(1)),
                             exit=self._one_exit[j].clone(), cost=self._one_cost[j].clone(),
                             logits=torch.from_numpy(logits) if self.keep_logits else None)

    def stream(self, batches, min_batch: int | None = None,
               max_wait: int | None = 16) -> Iterator[DynamicOutput]:
        """:meth:`DynamicEngine.stream` with this backend's thread handling around each piece
        of work between two yields (the consumer runs with its own thread count); reading
        the next input batch falls in that piece."""
        inner = super().stream(batches, min_batch=min_batch, max_wait=max_wait)
        one = self._one_thread(single=False)
        while True:
            with self._one_torch_thread() if one else nullcontext():
                out = next(inner, None)
            if out is None:
                return
            yield out

    def _one_thread(self, single: bool) -> bool:
        """Whether PyTorch runs on one thread during a call on a batch (``single``: of one
        sample).

        With onnxruntime, on batches, PyTorch only keeps the books (indexes the remaining
        samples, scores the logits): it runs on one thread meanwhile, because its idle OpenMP
        workers keep spinning after each parallel region, on the cores onnxruntime's threads
        then need. Measured on the 2-core AMD EPYC (mnist_budget resnet20, 5,120 MNIST test
        images at batch 256, 2 threads, median of 5): 0.0772 ms per image, 0.0565 with
        PyTorch on one thread during the call. A single sample needs no switch: PyTorch's few
        operations on it run on one thread anyway.

        The compiled backend runs a single sample on one thread, as onnxruntime does
        (:class:`_Pair`): at batch 1 the work per operation is too small to share, and with 2
        threads the frozen graphs switched between a fast and a slow mode within one process
        on the 2-core AMD EPYC (mnist_budget, exit 0's step, 500 MNIST test images one by one:
        0.39 ms, then 0.91-0.95 ms per image), while on one thread two runs held 0.345-0.36
        ms. Eager is left as it is: it is the reference the other backends are measured
        against."""
        return (self.backend == "onnxruntime" and not single) or \
            (self.backend == "compiled" and single)

    @contextmanager
    def _one_torch_thread(self):
        """PyTorch on one thread meanwhile (:meth:`_one_thread` says when). PyTorch's thread
        count is a process-wide setting: it is restored afterwards (also after an error), and
        a program running PyTorch work in other threads at the same time sees one thread
        meanwhile."""
        threads = torch.get_num_threads()
        if threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


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
    single = None
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
        single = onnx_steps(net, size, cache_dir, policy, threads)
        steps = single.steps
    build = time.perf_counter() - t0
    return BackendEngine(net, policy, cost_fractions, steps, backend, build, keep_logits,
                         single if backend == "onnxruntime" else None)
