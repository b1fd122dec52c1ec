"""Run an exported early-exit network with onnxruntime, with real per-sample early exit.

Reads a folder written by ``eenet-export`` (:mod:`eenet.export`): ``manifest.json``
and one ONNX file per piece. This file imports only numpy, onnxruntime and the
standard library, so it can be copied to a device that has no PyTorch (the
exporter puts a copy of it in the folder)::

    from onnx_runner import OnnxEarlyExitRunner
    runner = OnnxEarlyExitRunner("export/manifest.json")
    pred, exit_index, cost = runner(runner.preprocess(images))  # images: (B, C, H, W)

Input contract. ``preprocess(images)`` takes raw values, (B, C, H, W) (NCHW, C,
H and W those of ``manifest["input_size"]``), in the data set's own range
``manifest["input_range"]`` (e.g. [0, 1] for images; ``null`` when the export
did not record it, and then no range is checked), as float16 / float32 /
float64 (converted to float32), or uint8 0..255 images, accepted only when the
range is [0, 1] and scaled by 1/255. Values outside the range (by more than a
tolerance, see :data:`RANGE_TOLERANCE`) are refused: sklearn's 8x8 digits are
0..16 where the model was trained on 0..1, and would be classified wrongly
without a word. ``runner(x)`` takes the normalised batch ``preprocess``
returns: float16 / float32 / float64 (converted to float32), the same shape.
Both refuse, with a one-line :class:`RunnerError`, any other dtype, a wrong
shape, and NaN or infinite values (never classified: a NaN passes no threshold
and would leave at the final exit).

The walk is the one of ``eenet/inference/engine.py``: run segment j, then exit
j's head; the samples whose score beats the threshold leave with that exit's
prediction, and only the others go on to segment j + 1. The final exit takes
everything that is left. Between the pieces the runner carries the *live values*
by name (manifest format 3): each piece reads the values it names, adds the values
it computes, and after the exit only the values the manifest lists as ``live`` are
kept, each for the remaining samples only (a skip connection crossing a cut, an
early exit's features that the final exit reads). A format-2 manifest carries one
value from each segment to the next, and is read as the one-value case. An exit
whose threshold releases nobody (``inf``; not with patience, which counts every
exit's prediction; not for a head whose features a later piece reads) does not
run its head, and the reported cost leaves that head out, as the engine does (the
formula of ``eenet.cost.CostTable.fractions_skipping``, written again here because
this file must not import eenet). Scores, with the same strict ``score > threshold`` as
``eenet/policies.py`` (thresholds in the manifest are in the user's units)::

    confidence  s = sigmoid(z)                        leave when s > t         (EENets)
    max_prob    s = max_k p[k],  p = softmax(logits)  leave when s > t         (SDN, T-RecX)
    entropy     s = sum_k p[k] log p[k]  (= -H(p))    leave when s > t, i.e. H < -t  (BranchyNet)
    patience    s = how many consecutive exits, this  leave when s > t - 0.5,
                    one included, predict this class   i.e. s >= t             (PABEE)

For every policy a threshold of ``inf`` means "never leave here". Manifests of
format 1 held entropy thresholds as the entropy itself (leave when H < t, so
``inf`` meant "always leave"); such a manifest is refused in one line (re-run
eenet-export), other format-1 manifests are read as before.

Temperatures (manifest format 4, ``max_prob`` and ``entropy`` only): when the
policy lists one T_i > 0 per exit, exit i is scored on ``logits_i / T_i`` (float32
division, as ``eenet.policies.ExitPolicy.score_at``; Guo et al., ICML 2017); the
predictions are the argmax of the logits, which the division does not change.
A format-3 manifest has no temperatures.

Scores are computed in float32 with the same operations as the PyTorch
policies, so that ties with calibrated thresholds (which eenet-eval puts one
float32 step below a validation score) resolve the same way.

The manifest is data (JSON) and may come from someone else: every piece it
names must be a plain file name inside the manifest's folder. An absolute path,
a name with a folder part or ``..``, or a symlink that leads out of the folder
is refused with a one-line :class:`RunnerError` (a ``ValueError``) before any
model file is opened. So is every field the runner reads that has the wrong type
or size (:func:`check_manifest_fields`: pieces, the policy's name, thresholds and
temperatures, input_size, input, input_range, preprocessing, the cost table, and
num_classes and a piece's optional ``fused`` / ``fused_inputs`` / ``fused_outputs``
when present), in the form ``<manifest>: <field> is <found>; expected <accepted>``,
and a file that is not JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

#: The newest manifest format this runner reads (``eenet.export.onnx.FORMAT_VERSION``;
#: 4: the policy's temperatures).
MANIFEST_VERSION = 4
#: The policies that take temperatures (``eenet.policies.TEMPERATURE_POLICIES``).
TEMPERATURE_POLICIES = ("max_prob", "entropy")

#: Raw values may lie this far outside ``input_range``, as a share of its width. Data that
#: went through float16 (half a unit in the last place is 2**-11, about 4.9e-4, relative) or
#: a user's own float scaling stay within it; values of another scale (0..16 or 0..255
#: where 0..1 is expected) are off by a factor, far beyond it.
RANGE_TOLERANCE = 1e-3

#: dtypes converted to float32 without a word (floating point: a copy, no rescaling)
_FLOATS = (np.float16, np.float32, np.float64)


class RunnerError(ValueError):
    """A mistake in the runner's input or manifest; the message is one line."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _confidence(logits, conf_logit, state):
    with np.errstate(over="ignore"):  # exp(-z) = inf for very negative z gives h = 0
        return 1.0 / (1.0 + np.exp(-conf_logit.astype(np.float32))), state


def _max_prob(logits, conf_logit, state):
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1), state


def _entropy(logits, conf_logit, state):
    logp = _log_softmax(logits)
    return (np.exp(logp) * logp).sum(axis=1), state  # = -H(p)


def _patience(logits, conf_logit, state):
    prev, run = state
    pred = logits.argmax(axis=1)
    run = np.where(pred == prev, run + 1, np.ones_like(run))
    return run, (pred, run)


#: policy name -> (score function, user threshold t -> threshold in score units)
POLICIES = {
    "confidence": (_confidence, lambda t: t),
    "max_prob": (_max_prob, lambda t: t),
    "entropy": (_entropy, lambda t: t),
    "patience": (_patience, lambda t: t - np.float32(0.5)),
}


def _check_threshold(policy: str, t: float, where: object) -> None:
    """The ranges of ``eenet.policies`` (written again: this file does not import eenet);
    ``where``: the manifest, named in the message."""
    if np.isposinf(t) or (np.isneginf(t) and policy != "patience"):
        return  # inf: never leave here; -inf: always leave here (patience: k = 1)
    if policy == "patience":
        ok, accepted = t >= 1 and float(t).is_integer(), "a whole number of exits >= 1 or inf"
    elif policy == "entropy":
        ok, accepted = t < 0, "t < 0 (leave when -H > t), inf or -inf"
    else:
        ok, accepted = 0 < t < 1, "0 < t < 1, inf or -inf"
    if not ok:
        raise RunnerError(f"{where}: manifest {policy} threshold {t:g} is out of range: "
                          f"accepted {accepted}")


def _temperatures(policy: dict, name: str, num_exits: int, where: object) -> np.ndarray | None:
    """The manifest policy's temperatures as float32 (one per exit, finite, > 0), or None."""
    temps = policy.get("temperatures")
    if temps is None:
        return None
    if name not in TEMPERATURE_POLICIES:
        raise RunnerError(f"{where}: the {name} policy takes no temperatures (only "
                          f"{', '.join(TEMPERATURE_POLICIES)} score a softmax of the logits)")
    if not isinstance(temps, list) or len(temps) != num_exits or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and np.isfinite(t) and t > 0
            for t in temps):
        raise RunnerError(f"{where}: policy temperatures must be {num_exits} finite numbers > 0 "
                          f"(one per exit, the final exit included), got {temps!r}")
    return np.array(temps, dtype=np.float32)


def _plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name: no folder part, no ``..``, not absolute, no drive."""
    return (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
            and not any(c in name for c in "/\\:"))


def piece_path(folder: Path, name: object, where: object = None) -> Path:
    """The file of a piece named ``name`` in the manifest, checked to lie inside ``folder``.

    Raises :class:`RunnerError` (one line, starting with ``where``, the manifest, when given)
    for anything but a plain file name (no folder part, no ``..``, not absolute, no drive)
    whose real path, symlinks followed, is in ``folder``.
    """
    piece = f"{where}: piece" if where is not None else "manifest piece"
    if not _plain_name(name):
        raise RunnerError(f"{piece} {name!r} is not a plain file name in the export "
                          f"folder {folder}; refusing to open it")
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise RunnerError(f"{piece} {name!r} leads out of the export folder {folder} "
                          f"(to {path}); refusing to open it")
    if not path.is_file():
        raise RunnerError(f"{piece} {name!r} is not a file in the export folder {folder}")
    return path


def check_manifest_version(m: dict, where: object) -> None:
    """Refuse (one line) a manifest this runner cannot read with the meaning it was written with."""
    version = m.get("format_version")
    if m.get("format") != "eenet-onnx-segments" or isinstance(version, bool) \
            or not isinstance(version, int) or version < 1:
        raise RunnerError(f"{where} is not an eenet-export manifest (format "
                          f"{m.get('format')!r}, format_version {version!r})")
    if version > MANIFEST_VERSION:
        raise RunnerError(f"{where} was written by a newer eenet (manifest format {version}, this "
                          f"runner reads up to {MANIFEST_VERSION}): use the onnx_runner.py of "
                          f"its folder")
    policy = m.get("policy")
    if version < 2 and isinstance(policy, dict) and policy.get("name") == "entropy":
        raise RunnerError(f"{where} has entropy thresholds of manifest format {version} (leave "
                          f"when the entropy H < t, inf: always leave), which format 2 reads as "
                          f"-H > t (inf: never leave); re-run eenet-export for this run")


#: a field the manifest does not have (as opposed to one that is null)
_MISSING = object()


def _shown(value: object) -> str:
    """``value`` as a message shows it: ``missing``, or its repr cut to one short line."""
    if value is _MISSING:
        return "missing"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse(where: object, field: str, value: object, accepted: str) -> RunnerError:
    return RunnerError(f"{where}: {field} is {_shown(value)}; expected {accepted}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(v: object) -> float | None:
    """A JSON number as a float, or None (not a number, or an integer too large for one)."""
    try:
        return float(v) if _is_number(v) else None
    except OverflowError:
        return None


def _is_finite(v: object) -> bool:
    f = _as_float(v)
    return f is not None and math.isfinite(f)


def _is_count(v: object, least: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _threshold(t: object) -> float | None:
    """A threshold as the manifest may write it (a number, or a string such as "inf" or
    "-inf", since JSON has no infinity) as a float, or None."""
    if _is_number(t):
        return _as_float(t)
    if isinstance(t, str):
        try:
            return float(t)
        except ValueError:
            return None
    return None


def check_manifest_fields(m: dict, where: object) -> None:
    """Refuse (one line: ``<manifest>: <field> is <found>; expected <accepted>``) a manifest
    whose fields the runner reads have the wrong type or size, before any file is opened.

    What only the ONNX files can confirm (the names of the live values each file takes and
    gives) and the thresholds' ranges, which depend on the policy, are checked after this.
    """
    names = "a list of value names (non-empty strings)"
    pieces = m.get("pieces", _MISSING)
    if not isinstance(pieces, list) or not pieces:
        raise _refuse(where, "pieces", pieces, "a list of at least one piece object "
                      "({segment, head, ...}, in running order)")
    for i, piece in enumerate(pieces):
        if not isinstance(piece, dict):
            raise _refuse(where, f"pieces[{i}]", piece, "a piece object ({segment, head, ...})")
        for key in ("segment", "head"):
            if key not in piece:  # a name of the wrong kind: piece_path says so, naming it
                raise _refuse(where, f"pieces[{i}].{key}", _MISSING,
                              "a plain file name in the export folder")
        if any(k in piece for k in ("fused", "fused_inputs", "fused_outputs")):
            # optional (export_segments(fused=True), read by the engine's onnxruntime
            # backend): all three, or none
            for key in ("fused", "fused_inputs", "fused_outputs"):
                value = piece.get(key, _MISSING)
                if key == "fused" and not _plain_name(value):
                    raise _refuse(where, f"pieces[{i}].fused", value, "a plain file name in the "
                                  "export folder (with fused_inputs and fused_outputs)")
                if key != "fused" and (not isinstance(value, list) or not all(
                        isinstance(n, str) and n for n in value)):
                    raise _refuse(where, f"pieces[{i}].{key}", value,
                                  f"{names}, given with fused")
    n = len(pieces)

    policy = m.get("policy", _MISSING)
    if not isinstance(policy, dict):
        raise _refuse(where, "policy", policy, "an object {name, thresholds[, temperatures]}")
    name = policy.get("name", _MISSING)
    if not isinstance(name, str) or name not in POLICIES:
        raise _refuse(where, "policy.name", name, f"one of {', '.join(POLICIES)}")
    thresholds = policy.get("thresholds", _MISSING)
    accepted = (f"a list of {n - 1} thresholds, one per early exit (numbers, or \"inf\" / "
                f"\"-inf\" as strings)")
    if not isinstance(thresholds, list):
        raise _refuse(where, "policy.thresholds", thresholds, accepted)
    for i, t in enumerate(thresholds):
        if _threshold(t) is None:
            raise _refuse(where, f"policy.thresholds[{i}]", t,
                          "a number, or \"inf\" / \"-inf\" as a string")
    if len(thresholds) != n - 1:
        raise _refuse(where, "policy.thresholds", thresholds, accepted)

    size = m.get("input_size", _MISSING)
    if not isinstance(size, list) or len(size) != 3 or not all(_is_count(v) for v in size):
        raise _refuse(where, "input_size", size, "[C, H, W], three whole numbers >= 1")
    if "num_classes" in m and not _is_count(m["num_classes"]):
        raise _refuse(where, "num_classes", m["num_classes"], "a whole number >= 1")
    if "input" in m and not (isinstance(m["input"], str) and m["input"]):
        raise _refuse(where, "input", m["input"], "the name of the network's input, a "
                      "non-empty string")
    rng = m.get("input_range")
    if rng is not None and (not isinstance(rng, list) or len(rng) != 2
                            or not all(_is_finite(v) for v in rng) or not rng[0] < rng[1]):
        raise _refuse(where, "input_range", rng, "null or [lo, hi], finite numbers, lo < hi")
    pre = m.get("preprocessing")
    if pre is not None:
        if not isinstance(pre, dict):
            raise _refuse(where, "preprocessing", pre, "null or an object {mean, std}")
        channels = size[0]
        for key in ("mean", "std"):
            value = pre.get(key, _MISSING)
            if not isinstance(value, list) or len(value) not in (1, channels) or not all(
                    _is_finite(v) and (key == "mean" or v > 0) for v in value):
                lengths = "1" if channels == 1 else f"1 or {channels} (one per channel)"
                raise _refuse(where, f"preprocessing.{key}", value, "a list of finite numbers"
                              f"{' > 0' if key == 'std' else ''}, of length {lengths}")

    cost = m.get("cost")
    if cost is not None:  # null or absent: no cost table, the costs are NaN
        if not isinstance(cost, dict):
            raise _refuse(where, "cost", cost, "null or the cost table {backbone_macs, exits}")
        backbone = cost.get("backbone_macs", _MISSING)
        if not (_is_finite(backbone) and backbone > 0):
            raise _refuse(where, "cost.backbone_macs", backbone, "a finite number > 0")
        exits = cost.get("exits", _MISSING)
        if not isinstance(exits, list) or len(exits) != n:
            raise _refuse(where, "cost.exits", exits, f"a list of {n} exit objects, one per "
                          f"piece")
        for i, e in enumerate(exits):
            keys = ("macs", "head_macs") if i < n - 1 else ("macs",)
            if not isinstance(e, dict):
                raise _refuse(where, f"cost.exits[{i}]", e,
                              f"an object {{{', '.join(keys)}}}")
            for key in keys:
                value = e.get(key, _MISSING)
                if not (_is_finite(value) and value >= 0):
                    raise _refuse(where, f"cost.exits[{i}].{key}", value,
                                  "a finite number >= 0")


def _names(piece: dict, key: str, where: object) -> list[str]:
    value = piece.get(key)
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise RunnerError(f"{where}: piece {piece.get('exit')!r} has no list of value names "
                          f"'{key}' (manifest format 3)")
    return list(value)


class _Plan:
    """What one piece reads, computes and keeps: (name in the ONNX file, live value name)
    pairs, so that a format-2 file (inputs 'x' / 'features') reads as the one-value case."""

    def __init__(self, seg_feed, seg_fetch, head_feed, head_fetch, n_outputs, live, skippable):
        self.seg_feed, self.seg_fetch = seg_feed, seg_fetch
        self.head_feed, self.head_fetch = head_feed, head_fetch
        self.n_outputs, self.live, self.skippable = n_outputs, live, skippable


def _plan_v2(segment, head) -> _Plan:
    """A format-2 piece: one value ('v') from each segment to its head and the next segment."""
    outs = [o.name for o in head.get_outputs()]
    return _Plan([(segment.get_inputs()[0].name, "v")], [(segment.get_outputs()[0].name, "v")],
                 [(head.get_inputs()[0].name, "v")], [(n, n) for n in outs], len(outs), ["v"],
                 True)


def _plan_v3(piece: dict, segment, head, available: set, first: str, where: object) -> _Plan:
    """A format-3 piece, checked against its ONNX files and the values available before it."""
    seg_in, seg_out = _names(piece, "segment_inputs", where), _names(piece, "segment_outputs", where)
    head_in = _names(piece, "head_inputs", where)
    head_live = _names(piece, "head_live_outputs", where)
    outputs, live = _names(piece, "outputs", where), _names(piece, "live", where)
    skippable = piece.get("skippable")
    if not isinstance(skippable, bool) or (skippable and head_live):
        raise RunnerError(f"{where}: piece {piece.get('exit')!r} has skippable={skippable!r}; "
                          f"accepted: true or false, false when its head adds live values")
    for file, sess, inputs, fetched in ((piece["segment"], segment, seg_in, seg_out),
                                        (piece["head"], head, head_in, [*outputs, *head_live])):
        declared = [i.name for i in sess.get_inputs()]
        produced = [o.name for o in sess.get_outputs()]
        if sorted(declared) != sorted(inputs) or not set(fetched) <= set(produced):
            raise RunnerError(f"{where}: {file} takes {declared} and gives {produced}, the "
                              f"manifest says {inputs} -> {fetched}: it does not belong to this "
                              f"manifest")
        missing = [n for n in inputs if n not in available]
        if missing:
            raise RunnerError(f"{where}: {file} reads {missing}, which no earlier piece gives "
                              f"(available: {sorted(available)}; the input is '{first}')")
        available = available | set(seg_out)
    unknown = [n for n in live if n not in available | set(head_live)]
    if unknown:
        raise RunnerError(f"{where}: piece {piece.get('exit')!r} keeps {unknown}, which no piece "
                          f"gives")
    return _Plan([(n, n) for n in seg_in], [(n, n) for n in seg_out], [(n, n) for n in head_in],
                 [(n, n) for n in (*outputs, *head_live)], len(outputs), live, skippable)


def _as_batch(x, what: str, input_size: tuple, allow_uint8: bool = False) -> np.ndarray:
    """``x`` as a C-contiguous array of shape (B, *input_size): floats become float32 and
    uint8 stays uint8 when allowed; anything else is refused in one line."""
    try:
        x = np.asarray(x)
    except (ValueError, TypeError):  # numpy's own words say nothing of what to pass
        raise RunnerError(f"{what} is a {type(x).__name__} that is not one array of numbers "
                          f"(nested lists of different lengths, or items that are not numbers): "
                          f"pass an array of shape (batch, {', '.join(map(str, input_size))}) "
                          f"(NCHW)") from None
    if x.dtype not in _FLOATS and not (allow_uint8 and x.dtype == np.uint8):
        hint = ("pass runner.preprocess(images) (uint8 images 0..255 are scaled there)"
                if x.dtype == np.uint8 else "pass float32 values")
        raise RunnerError(f"{what} of dtype {x.dtype} is not accepted "
                          f"({'uint8 or ' if allow_uint8 else ''}float16/32/64): {hint}")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_size):
        raise RunnerError(f"{what} of shape {x.shape} does not fit: expected (batch, "
                          f"{', '.join(map(str, input_size))}) (NCHW)")
    if x.dtype != np.uint8:
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x).all(axis=(1, 2, 3))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise RunnerError(f"{what} holds NaN or infinite values in {len(bad)} of {len(x)} "
                              f"samples (the first: sample {bad[0]}); they are refused, not "
                              f"classified: drop or repair those samples")
    return x


def _initial_state(policy: str, batch: int) -> tuple:
    if policy == "patience":  # (previous exit's class, run length)
        return np.full(batch, -1, dtype=np.int64), np.zeros(batch, dtype=np.float32)
    return ()


class OnnxEarlyExitRunner:
    """Per-sample early exit over the ONNX segments listed in a manifest.

    Args:
        manifest_path: ``manifest.json`` written by ``eenet-export`` (or its folder).
        providers: onnxruntime execution providers, in order of preference.
        threads: onnxruntime's intra-op threads (its default: one per core).
        spinning: whether idle intra-op threads spin waiting for work (onnxruntime's
            default) rather than sleep; spinning threads take cores from other work in the
            same process between runs (PyTorch's threads in the engine backend).
    """

    def __init__(self, manifest_path: str | Path, providers=("CPUExecutionProvider",),
                 threads: int | None = None, spinning: bool = True):
        path = Path(manifest_path)
        if path.is_dir():
            path = path / "manifest.json"
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise RunnerError(f"{path} is not an eenet-export manifest (not UTF-8 text)") from None
        except json.JSONDecodeError as exc:
            raise RunnerError(f"{path} is not an eenet-export manifest (not valid JSON: "
                              f"{exc})") from None
        self.manifest = m
        if not isinstance(m, dict):
            raise RunnerError(f"{path} is not an eenet-export manifest (not a JSON object)")
        check_manifest_version(m, path)
        check_manifest_fields(m, path)  # every field read below has its type and size
        n = len(m["pieces"])
        self.policy = m["policy"]["name"]
        score_fn, to_score_units = POLICIES[self.policy]
        self._score = score_fn
        thresholds = np.array([float(t) for t in m["policy"]["thresholds"]], dtype=np.float32)
        for t in thresholds:
            _check_threshold(self.policy, float(t), path)
        self.thresholds = to_score_units(thresholds)
        #: exit i's temperature T_i (float32), or None: its logits are scored as they are
        self.temperatures = _temperatures(m["policy"], self.policy, n, path)
        self.input_size = tuple(m["input_size"])
        #: the raw values' range the model was trained on (before normalisation), or None
        self.input_range = None if m.get("input_range") is None else \
            tuple(float(v) for v in m["input_range"])

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:  # idle worker threads sleep at once instead of spinning for work
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        files = [(piece_path(path.parent, p["segment"], path),
                  piece_path(path.parent, p["head"], path))
                 for p in m["pieces"]]  # every name checked before any file is opened

        self._options, self._providers = options, list(providers)
        self._folder = path.parent
        session = self.open_session
        self.pieces = [(session(segment), session(head)) for segment, head in files]
        #: the name of the network's input among the live values
        self.input_name = "v"  # format 2: one unnamed value
        if m["format_version"] >= 3:
            self.input_name = m.get("input", "x")
            self._plans, available = [], {self.input_name}
            for piece, (segment, head) in zip(m["pieces"], self.pieces):
                plan = _plan_v3(piece, segment, head, available, self.input_name, path)
                self._plans.append(plan)
                available = set(plan.live)
            if self._plans and self._plans[-1].live:
                raise RunnerError(f"{path}: the final piece keeps live values {self._plans[-1].live}"
                                  f"; it ends the walk")
        else:
            self._plans = [_plan_v2(segment, head) for segment, head in self.pieces]
        # an exit whose threshold is +inf (score units) releases no sample: its head is not
        # run and not charged (as in eenet's dynamic engine); patience needs every head
        # (not for a head whose features a later piece reads: not skippable)
        self.idle = [self.policy != "patience" and bool(np.isposinf(t)) and plan.skippable
                     for t, plan in zip(self.thresholds, self._plans)]
        cost = m.get("cost")
        if cost is not None:
            macs = np.array([e["macs"] for e in cost["exits"]], dtype=np.float64)
            heads = np.array([e["head_macs"] for e in cost["exits"][:-1]], dtype=np.float64)
            saved = np.cumsum(heads * np.array(self.idle, dtype=np.float64))
            macs -= np.append(saved, saved[-1] if len(saved) else 0.0)
            self.costs = macs / cost["backbone_macs"]
        else:
            self.costs = np.full(n, np.nan)

    def open_session(self, file: str | Path):
        """An onnxruntime session on ``file`` (a name in the export folder, checked like the
        pieces', or a path) with this runner's options and providers."""
        if isinstance(file, str):
            file = piece_path(self._folder, file)
        return ort.InferenceSession(str(file), self._options, providers=self._providers)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Raw values (B, C, H, W) in ``input_range`` -> normalised float32 (module docstring).

        uint8 images (0..255) are accepted when ``input_range`` is [0, 1], and scaled by 1/255.
        """
        pre = self.manifest.get("preprocessing")
        if pre is None:
            raise RunnerError("the manifest has no preprocessing (mean/std): pass normalised "
                              "values to the runner itself")
        unit = self.input_range == (0.0, 1.0)
        x = _as_batch(images, "images", self.input_size, allow_uint8=True)
        if x.dtype == np.uint8:
            if not unit:
                raise RunnerError(f"uint8 images are scaled by 1/255 only for a model trained on "
                                  f"[0, 1]; this export's input range is "
                                  f"{list(self.input_range) if self.input_range else 'not recorded'}"
                                  f": pass float32 values in it")
            x = x.astype(np.float32) / np.float32(255.0)
        elif self.input_range is not None:
            lo, hi = self.input_range
            slack = RANGE_TOLERANCE * (hi - lo)
            low, high = float(x.min(initial=lo)), float(x.max(initial=hi))
            if low < lo - slack or high > hi + slack:
                raise RunnerError(f"images hold values in [{low:g}, {high:g}] but the model was "
                                  f"trained on [{lo:g}, {hi:g}] (before normalisation): rescale "
                                  f"them (e.g. sklearn's digits 0..16: divide by 16)")
        mean = np.array(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.array(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(pred, exit_index, cost)`` per sample for a normalised batch ``x`` (B, C, H, W).

        ``x`` is what :meth:`preprocess` returns: float16 / float32 / float64 (converted to
        float32), finite; other dtypes, NaN / inf and wrong shapes are refused in one line.
        ``exit_index`` is 0..N (N = the final exit); ``cost`` is that exit's cost
        fraction from the manifest (NaN when the export had no cost table).
        """
        x = _as_batch(x, "input", self.input_size)
        b = x.shape[0]
        pred = np.zeros(b, dtype=np.int64)
        exit_index = np.zeros(b, dtype=np.int64)
        if b == 0:
            return pred, exit_index, self.costs[exit_index]
        remaining = np.arange(b)
        state = _initial_state(self.policy, b)
        last = len(self.pieces) - 1
        values = {self.input_name: x}  # every live value, for the remaining samples
        for j, ((segment, head), plan) in enumerate(zip(self.pieces, self._plans)):
            outs = segment.run([f for f, _ in plan.seg_fetch],
                               {f: values[v] for f, v in plan.seg_feed})
            values.update((v, o) for (_, v), o in zip(plan.seg_fetch, outs))
            if j < last and self.idle[j]:
                continue  # nobody leaves here: the head is not run (it adds no live value)
            outs = head.run([f for f, _ in plan.head_fetch], {f: values[v] for f, v in plan.head_feed})
            values.update((v, o) for (_, v), o in zip(plan.head_fetch[plan.n_outputs:],
                                                       outs[plan.n_outputs:]))
            logits = outs[0]
            if j == last:  # the final exit releases every sample that reaches it
                leave = np.ones(len(remaining), dtype=bool)
            else:
                scored = logits if self.temperatures is None else \
                    logits.astype(np.float32) / self.temperatures[j]
                score, state = self._score(scored, outs[1], state)
                leave = score > self.thresholds[j]
            ids = remaining[leave]
            pred[ids] = logits[leave].argmax(axis=1)
            exit_index[ids] = j
            if leave.all():
                break  # nobody is left: later segments never run
            stay = ~leave
            values = {v: values[v][stay] for v in plan.live}  # only what later pieces read
            remaining = remaining[stay]
            state = tuple(s[stay] for s in state)
        return pred, exit_index, self.costs[exit_index]
