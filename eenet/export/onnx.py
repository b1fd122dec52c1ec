"""An early-exit network as ONNX segments plus a JSON manifest (:func:`export_segments`).

The command ``eenet-export`` (:mod:`eenet.cli.export`, job :mod:`eenet.jobs.export`)::

    eenet-export run=RUN_DIR eval=RUN_DIR/eval/<time>/results.json out=DIR
    eenet-export run=RUN_DIR policy=max_prob thresholds=[0.9,0.8] out=DIR

The network is cut where :meth:`walk` cuts it (the steps that the static path,
the PyTorch dynamic engine :mod:`eenet.inference.engine`, the latency and the cost
tables all run), so that a runner can stop per sample exactly as the engine does.
Each step is a segment on the *live values* (every tensor a later piece reads: the
stage output of a staged backbone; the skip connections crossing a cut of a
traced graph, :mod:`eenet.models.graph_split`; an early exit's features that a
T-RecX ``concat`` final exit reads), then the exit after it. For N early exits
(exits 0..N-1, the final exit N), the output folder holds::

    segment_0.onnx   up to exit 0          x (B, C, H, W) -> the live values it computes
    exit_0.onnx      exit 0's head          the live value it reads -> logits (B, K),
                                            conf_logit (B,)[, live values it adds]
    segment_j.onnx   the part after exit j-1 up to exit j (live values in, live values out)
    exit_j.onnx      exit j's head
    segment_N.onnx   the rest of the model
    final.onnx       the final exit         -> logits (B, K)
    manifest.json    what to run in which order, the live values, the policy, costs,
                     preprocessing
    onnx_runner.py   a copy of :mod:`eenet.export.onnx_runner` (numpy + onnxruntime only)
    fused_j.onnx     (``fused=True`` only) segment_j and its head as one graph, for the
                     onnxruntime engine backend; the piece lists it as ``fused`` with
                     ``fused_inputs`` and ``fused_outputs``

Every piece is "segment, then head", and the only special case is that the final
head releases every sample (h_N = 1, so it has no confidence output). A live value
has one name throughout (the network's input is ``x``; a cut graph's values take
their node's name, a staged backbone's stage output ``features_j``, an exit's
carried features ``exit_j.features``), which is also its input and output name in
every ONNX file: a piece takes exactly the values it reads, and returns only the
values it computes (a value carried past a piece unchanged is not an output of it).
Every file has a dynamic batch axis (axis 0) and is exported in eval mode
(BatchNorm uses its running statistics). Each piece is checked against PyTorch with
onnxruntime after export. Every file is written atomically
(:func:`eenet.io.atomic_write`): a symlink already at a file's place is replaced,
never written through.

``manifest.json`` (``format: eenet-onnx-segments``, ``format_version``: 3, or 4 with temperatures)::

    eenet_version, opset, input_size [C, H, W] (float32, NCHW),
    input_range: [lo, hi] of the raw values the model was trained on, before
          normalisation (e.g. [0, 1] for images), or null when not given;
          the runner's ``preprocess`` refuses values outside it
    num_classes, num_exits (N + 1: the final exit counts), exit_stages,
    input: "x", the name of the network's input
    pieces: in running order, [{exit, segment, head, outputs,
             segment_inputs, segment_outputs,   live values the segment reads / computes
             head_inputs, head_live_outputs,    live values the head reads / adds (after
                                                its ``outputs``: logits[, conf_logit])
             live,                              the live values after this piece, kept
                                                for the samples that go on ([] at the end)
             skippable}, ...]                   whether the head may be left out when the
                                                exit releases nobody (false when a later
                                                piece reads what it adds)
    policy: {name, thresholds: one per early exit, in the user's units
             (eenet.policies: leave when score > t; "inf", never leave here, and
             "-inf" as strings since JSON has no infinity), rule,
             temperatures (format 4, max_prob and entropy only): one T_i > 0 per exit,
             the final exit included; exit i is scored on logits_i / T_i}
    cost: the eenet.cost table {backbone_macs, input_size, convention, exits:
          [{name, stage, head_macs, macs, cost_fraction}], always_run}; MACs as counted
          by fvcore (one fused multiply-add = one flop), exit heads included
    preprocessing: {mean, std, rule} or null
    runner: "onnx_runner.py"

Format 4 is format 3 plus the policy's per-exit temperatures (``eenet-eval
temperature=true``); an export without temperatures is written as format 3, so
that every runner that reads format 3 reads it, and a runner that would ignore
the temperatures refuses a format-4 manifest instead of deciding differently.
Format 3 names the live values, so that a segment may take and
return several (format 2: one value from each segment to the next, which format 3
reads exactly: the runner reads both). Format 2 oriented the entropy policy like
the others: its score is -H and a sample leaves when -H > t (format 1: when
H < t, so ``inf`` meant "always leave"); it added ``input_range``. The runner
refuses a format-1 manifest with entropy thresholds and reads the others as
before.

The exporter is PyTorch's TorchScript-based one (``dynamo=False``): the
torch.export-based exporter needs ``onnxscript``, which eenet does not require.
"""

from __future__ import annotations

import inspect
import io
import json
import warnings
from pathlib import Path
from typing import Callable, Sequence

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
FORMAT_VERSION = 4  # 2: entropy thresholds are -H units (leave when -H > t), input_range;
#                     3: named live values, several per segment; 4: policy temperatures
#: The format of an export whose policy carries no temperatures (every format-3 runner reads it).
FORMAT_WITHOUT_TEMPERATURES = 3
RULES = {
    "confidence": "leave at exit i when sigmoid(conf_logit_i) > t_i",
    "max_prob": "leave at exit i when max_k softmax(logits_i)[k] > t_i",
    "entropy": "leave at exit i when -H(softmax(logits_i)) > t_i, i.e. its entropy H (nats) < -t_i",
    "patience": "leave at exit i when exits i-t_i+1..i all predict the same class",
}
#: The rule's text when the policy carries temperatures (max_prob and entropy).
RULES_WITH_TEMPERATURES = {
    "max_prob": "leave at exit i when max_k softmax(logits_i / T_i)[k] > t_i",
    "entropy": "leave at exit i when -H(softmax(logits_i / T_i)) > t_i, i.e. its entropy H "
               "(nats) < -t_i",
}


class _Piece(nn.Module):
    """One callable of a walk step (a segment or an exit head) as a module for the exporter.

    ``fn`` maps the live tuple to its outputs; ``pick`` chooses the outputs the piece
    returns (the values it computes). ``owner`` (the network) is registered so that
    the tracer sees the parameters ``fn`` reads as parameters, not constants.
    """

    def __init__(self, owner: nn.Module, fn: Callable[[tuple], tuple], pick: Sequence[int]):
        super().__init__()
        self.owner = owner
        self.fn = fn
        self.pick = list(pick)

    def forward(self, *live: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(tuple(live))
        return tuple(out[i] for i in self.pick)


def _export(module: nn.Module, inputs: Sequence[torch.Tensor], path: Path,
            input_names: Sequence[str], output_names: Sequence[str], opset: int) -> list[str]:
    """Export one piece to ``path`` atomically (a symlink there is replaced, not followed);
    return the names of the inputs the ONNX graph kept (the exporter drops unread ones)."""
    import onnx

    extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(module, tuple(inputs), buffer, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, **extra)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    kept = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    outputs = [o.name for o in graph.output]
    if outputs != list(output_names):
        raise RuntimeError(f"{path.name}: the exporter returned outputs {outputs}, expected "
                           f"{list(output_names)}")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return [n for n in input_names if n in kept]


def _check(path: Path, feeds: dict[str, torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
    """Run one exported piece with onnxruntime and compare it with PyTorch's outputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
    if len(got) != len(expected):
        raise RuntimeError(f"{path.name} has {len(got)} outputs, PyTorch {len(expected)}")
    for g, e in zip(got, expected):
        e = e.numpy()
        if g.shape != e.shape or not np.allclose(g, e, rtol=1e-3, atol=1e-4):
            diff = np.abs(g - e).max() if g.shape == e.shape else f"shape {g.shape} != {e.shape}"
            raise RuntimeError(f"{path.name} differs from PyTorch after export: {diff}")


def _new(values: Sequence[torch.Tensor], known: Sequence[torch.Tensor]) -> list[int]:
    """Positions of ``values`` that are not one of ``known`` (the same tensor object) nor a
    repeat of an earlier position: what a piece computes rather than carries through."""
    out: list[int] = []
    for i, v in enumerate(values):
        if not any(v is k for k in known) and not any(v is values[j] for j in out):
            out.append(i)
    return out


def _name_of(v: torch.Tensor, live: Sequence[torch.Tensor], names: Sequence[str]) -> str:
    return next(n for u, n in zip(live, names) if u is v)


def _export_fused(net: EarlyExitNetwork, step, j: int, final: bool, live: tuple,
                  names: list[str], computed: list[int], added: list[int],
                  output_names: list[str], out: Path, opset: int, check: bool,
                  reference: tuple) -> dict:
    """Step ``j``'s segment and head as one graph (``export_segments(fused=True)``): the
    head's outputs, the values it adds and the values the segment computes; the final
    piece's logits only. ``reference``: what the step gave on ``live`` during the export,
    ``(logits, z, the head's live values, the segment's values)``. Returns the piece's
    ``fused`` entries."""
    def fused_fn(lv):
        body_out = tuple(step.body(lv))
        logits, z, after = step.head(body_out)
        return (logits, z, *after, *body_out)

    logits, z, after, body_out = reference
    ref = (logits, z, *after, *body_out)  # what fused_fn gives on live
    if final:
        pick, output_names = [0], output_names[:1]
    else:
        pick = [0, 1, *(2 + k for k in added), *(2 + len(after) + k for k in computed)]
    file = f"fused_{j}.onnx"
    inputs = _export(_Piece(net, fused_fn, pick).eval(), live, out / file, names, output_names,
                     opset)
    if check:
        _check(out / file, dict(zip(names, live)), [ref[k] for k in pick])
    return {"fused": file, "fused_inputs": inputs, "fused_outputs": output_names}


def export_segments(net: EarlyExitNetwork, input_size: Sequence[int], out_dir: str | Path,
                    policy: ExitPolicy, cost_table: CostTable | None = None, opset: int = 17,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    check: bool = True, input_range: Sequence[float] | None = None,
                    fused: bool = False) -> Path:
    """Write the ONNX pieces of ``net`` and ``manifest.json`` into ``out_dir``; return the manifest.

    Args:
        net: the early-exit network (put in eval mode for the export, then restored).
        input_size: ``(C, H, W)`` of one input.
        out_dir: output folder, created if needed.
        policy: exit policy and thresholds (and its temperatures, if any) written into the
            manifest.
        cost_table: per-exit MACs (traced with fvcore when not given).
        opset: ONNX opset.
        mean, std: per-channel normalisation of the inputs, recorded when given.
        check: run every piece with onnxruntime and compare it with PyTorch.
        input_range: ``(lo, hi)``, the range of the data set's raw values before
            normalisation (``(0, 1)`` for images scaled from 0..255); recorded so that
            the runner refuses inputs of another scale. ``None``: not recorded.
        fused: also write each piece's segment and head as one graph, ``fused_<j>.onnx``
            (the piece's ``fused``, ``fused_inputs`` and ``fused_outputs``: its ``outputs``,
            then ``head_live_outputs``, then ``segment_outputs``; the final piece's
            ``outputs`` only), which the onnxruntime engine backend runs when the head is
            not left out: one call instead of two (:mod:`eenet.inference.backends`).
    """
    if not callable(getattr(net, "walk", None)):
        raise EENetError(f"ONNX segment export takes an early-exit network with a walk() (an "
                         f"EarlyExitNetwork or a model cut by eenet.attach_exits), got "
                         f"{type(net).__name__}")
    n_early = net.num_exits - 1
    policy.threshold_vector(n_early)  # checks the number of thresholds
    policy.check_exits(net.num_exits)  # and of the temperatures, if any
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
        graph_names = net.live_values() if callable(getattr(net, "live_values", None)) else None
        steps = net.walk()
        last = len(steps) - 1
        used = {"x"}

        def fresh(name: str, j: int) -> str:
            name = name if name not in used else f"{name}@{j}"
            used.add(name)
            return name

        with torch.no_grad():
            live, names = (x,), ["x"]
            for j, step in enumerate(steps):
                final = j == last
                piece = {"exit": j, "segment": f"segment_{j}.onnx",
                         "head": "final.onnx" if final else f"exit_{j}.onnx",
                         "outputs": ["logits"] if final else ["logits", "conf_logit"]}
                # the segment: live values in, the values it computes out
                body_out = tuple(step.body(live))
                computed = _new(body_out, live)
                body_names = []
                for k, v in enumerate(body_out):
                    if k in computed:
                        given = graph_names[j][k] if graph_names and not final else (
                            "output" if graph_names else f"features_{j}")
                        body_names.append(fresh(given, j))
                    else:  # carried through, or a repeat of an earlier output
                        body_names.append(_name_of(v, [*live, *body_out[:k]], [*names, *body_names]))
                seg_out = [body_names[k] for k in computed]
                seg_in = _export(_Piece(net, step.body, computed).eval(), live,
                                 out / piece["segment"], names, seg_out, opset)
                # the head: reads some live values, gives logits (and conf_logit), may add values
                logits, z, after = step.head(body_out)
                after = tuple(after)
                added = _new(after, body_out)
                if step.skippable and added:
                    raise RuntimeError(f"internal: exit {j}'s head adds a live value but is "
                                       "marked skippable")
                after_names = [fresh(f"exit_{j}.features", j) if k in added
                               else _name_of(v, body_out, body_names) for k, v in enumerate(after)]
                added_names = [after_names[k] for k in added]
                if final:
                    head_fn, pick, head_out = (lambda lv, h=step.head: h(lv)[:1]), [0], [logits]
                else:
                    def head_fn(lv, h=step.head):
                        lg, zz, rest = h(lv)
                        return (lg, zz, *rest)
                    pick = [0, 1, *(2 + k for k in added)]
                    head_out = [logits, z, *(after[k] for k in added)]
                head_in = _export(_Piece(net, head_fn, pick).eval(), body_out,
                                  out / piece["head"], body_names,
                                  [*piece["outputs"], *added_names], opset)
                if check:
                    feeds = dict(zip(names, live))
                    _check(out / piece["segment"], feeds, [body_out[k] for k in computed])
                    _check(out / piece["head"], dict(zip(body_names, body_out)), head_out)
                if fused:
                    piece.update(_export_fused(net, step, j, final, live, names, computed,
                                               added, [*piece["outputs"], *added_names, *seg_out],
                                               out, opset, check, (logits, z, after, body_out)))
                piece.update(segment_inputs=seg_in, segment_outputs=seg_out, head_inputs=head_in,
                             head_live_outputs=added_names,
                             live=[] if final else after_names,
                             skippable=bool(step.skippable) and not final)
                pieces.append(piece)
                live, names = after, after_names
    finally:
        net.train(was_training)

    temps = policy.temperatures
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if temps is not None else FORMAT_WITHOUT_TEMPERATURES,
        "eenet_version": eenet.__version__,
        "opset": opset,
        "input_size": list(input_size),
        "input_range": input_range,
        "num_classes": net.num_classes,
        "num_exits": net.num_exits,
        "exit_stages": net.exit_stage_indices(),
        "input": "x",
        "pieces": pieces,
        "policy": {"name": policy.name, "thresholds": [json_float(float(v)) for v in thresholds],
                   "rule": (RULES if temps is None else RULES_WITH_TEMPERATURES).get(policy.name, ""),
                   **({} if temps is None else {"temperatures": [float(t) for t in temps]})},
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
