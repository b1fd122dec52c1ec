"""Run an exported early-exit network with onnxruntime, with real per-sample early exit.

Reads a folder written by ``eenet-export`` (:mod:`eenet.export`): ``manifest.json``
and one ONNX file per piece. This file imports only numpy, onnxruntime and the
standard library, so it can be copied to a device that has no PyTorch (the
exporter puts a copy of it in the folder)::

    from onnx_runner import OnnxEarlyExitRunner
    runner = OnnxEarlyExitRunner("export/manifest.json")
    pred, exit_index, cost = runner(runner.preprocess(images))  # images: (B, C, H, W)

The walk is the one of ``eenet/inference/engine.py``: run segment j, then exit
j's head; the samples whose score beats the threshold leave with that exit's
prediction, and only the others go on to segment j + 1. The final exit takes
everything that is left. An exit whose threshold releases nobody (``inf``; not
with patience, which counts every exit's prediction) does not run its head, and
the reported cost leaves that head out, as the engine does (the formula of
``eenet.cost.CostTable.fractions_skipping``, written again here because this file
must not import eenet). Scores, with the same strict ``score > threshold`` as
``eenet/policies.py`` (thresholds in the manifest are in the user's units)::

    confidence  s = sigmoid(z)                        leave when s > t         (EENets)
    max_prob    s = max_k p[k],  p = softmax(logits)  leave when s > t         (SDN, T-RecX)
    entropy     s = sum_k p[k] log p[k]  (= -H(p))    leave when s > -t, i.e. H < t  (BranchyNet)
    patience    s = how many consecutive exits, this  leave when s > t - 0.5,
                    one included, predict this class   i.e. s >= t             (PABEE)

Scores are computed in float32 with the same operations as the PyTorch
policies, so that ties with calibrated thresholds (which eenet-eval puts one
float32 step below a validation score) resolve the same way.

The manifest is data (JSON) and may come from someone else: every piece it
names must be a plain file name inside the manifest's folder. An absolute path,
a name with a folder part or ``..``, or a symlink that leads out of the folder
is refused with a one-line ``ValueError`` before any model file is opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


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
    "entropy": (_entropy, lambda t: -t),
    "patience": (_patience, lambda t: t - np.float32(0.5)),
}


def piece_path(folder: Path, name: object) -> Path:
    """The file of a piece named ``name`` in the manifest, checked to lie inside ``folder``.

    Raises ``ValueError`` (one line) for anything but a plain file name (no folder part,
    no ``..``, not absolute, no drive) whose real path, symlinks followed, is in ``folder``.
    """
    if (not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name
            or any(c in name for c in "/\\:")):
        raise ValueError(f"manifest piece {name!r} is not a plain file name in the export "
                         f"folder {folder}; refusing to open it")
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"manifest piece {name!r} leads out of the export folder {folder} "
                         f"(to {path}); refusing to open it")
    if not path.is_file():
        raise ValueError(f"manifest piece {name!r} is not a file in the export folder {folder}")
    return path


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
    """

    def __init__(self, manifest_path: str | Path, providers=("CPUExecutionProvider",),
                 threads: int | None = None):
        path = Path(manifest_path)
        if path.is_dir():
            path = path / "manifest.json"
        self.manifest = m = json.loads(path.read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads

        files = [(piece_path(path.parent, p["segment"]), piece_path(path.parent, p["head"]))
                 for p in m["pieces"]]  # every name checked before any file is opened

        def session(file):
            return ort.InferenceSession(str(file), options, providers=list(providers))

        self.pieces = [(session(segment), session(head)) for segment, head in files]
        self.policy = m["policy"]["name"]
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}'; accepted: {', '.join(POLICIES)}")
        score_fn, to_score_units = POLICIES[self.policy]
        self._score = score_fn
        thresholds = np.array([float(t) for t in m["policy"]["thresholds"]], dtype=np.float32)
        self.thresholds = to_score_units(thresholds)
        n = len(self.pieces)
        if len(self.thresholds) != n - 1:
            raise ValueError(f"{len(self.thresholds)} thresholds for {n - 1} early exits")
        # an exit whose threshold is +inf (score units) releases no sample: its head is not
        # run and not charged (as in eenet's dynamic engine); patience needs every head
        self.idle = [self.policy != "patience" and bool(np.isposinf(t)) for t in self.thresholds]
        cost = m.get("cost")
        if cost:
            macs = np.array([e["macs"] for e in cost["exits"]], dtype=np.float64)
            heads = np.array([e["head_macs"] for e in cost["exits"][:-1]], dtype=np.float64)
            saved = np.cumsum(heads * np.array(self.idle, dtype=np.float64))
            macs -= np.append(saved, saved[-1] if len(saved) else 0.0)
            self.costs = macs / cost["backbone_macs"]
        else:
            self.costs = np.full(n, np.nan)
        self.input_size = tuple(m["input_size"])

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 images in 0..255 (or floats in [0, 1]), (B, C, H, W) -> normalised float32."""
        pre = self.manifest.get("preprocessing")
        if pre is None:
            raise ValueError("the manifest has no preprocessing (mean/std)")
        x = images.astype(np.float32)
        if images.dtype == np.uint8:
            x /= 255.0
        mean = np.array(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.array(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(pred, exit_index, cost)`` per sample for a normalised batch ``x`` (B, C, H, W).

        ``exit_index`` is 0..N (N = the final exit); ``cost`` is that exit's cost
        fraction from the manifest (NaN when the export had no cost table).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.input_size[0]:
            raise ValueError(f"input of shape {x.shape} does not fit: expected "
                             f"(batch, {', '.join(map(str, self.input_size))})")
        b = x.shape[0]
        pred = np.zeros(b, dtype=np.int64)
        exit_index = np.zeros(b, dtype=np.int64)
        if b == 0:
            return pred, exit_index, self.costs[exit_index]
        remaining = np.arange(b)
        state = _initial_state(self.policy, b)
        last = len(self.pieces) - 1
        for j, (segment, head) in enumerate(self.pieces):
            x = segment.run(None, {segment.get_inputs()[0].name: x})[0]
            if j < last and self.idle[j]:
                continue  # nobody leaves here: the head is not run
            outs = head.run(None, {head.get_inputs()[0].name: x})
            logits = outs[0]
            if j == last:  # the final exit releases every sample that reaches it
                leave = np.ones(len(remaining), dtype=bool)
            else:
                score, state = self._score(logits, outs[1], state)
                leave = score > self.thresholds[j]
            ids = remaining[leave]
            pred[ids] = logits[leave].argmax(axis=1)
            exit_index[ids] = j
            if leave.all():
                break  # nobody is left: later segments never run
            stay = ~leave
            x, remaining = x[stay], remaining[stay]
            state = tuple(s[stay] for s in state)
        return pred, exit_index, self.costs[exit_index]
