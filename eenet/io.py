"""File I/O of eenet in one place: atomic writes and safe loading.

- Writes go to a temporary file in the same folder, are flushed to disk and
  renamed over the target, so a process killed at any moment leaves either the
  old file or the new one, never a truncated file where a good one was. The
  file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less
  the process umask: 0644 under umask 022), not ``mkstemp``'s private 0600.
- Tensor files (weights, checkpoints) are read with
  ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain
  Python values: a file carrying a pickled object that would run code is
  refused and the code never runs.
- Plain pickles (CIFAR's python batches) are read by :func:`safe_pickle_load`,
  which rebuilds only plain Python values and numpy arrays: any other global a
  pickle names (``os.system``, a class with ``__reduce__``) is refused before it
  is imported or called.
- JSON has no infinity: thresholds are written as ``"inf"`` / ``"-inf"``.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

from eenet.errors import EENetError


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting it and
    setting it back (``os.umask`` has no read-only form).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it.

    A process killed at any moment leaves either the old file or the new one. The file
    gets mode ``0o666 & ~umask``, as ``open(path, "w")`` would give a new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes it 0600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_load_reason(exc: BaseException) -> str:
    """The informative part of torch.load's refusal, on one line.

    torch's weights-only message opens with general advice (to retry with
    ``weights_only=False``, which would run the file's code) and names the
    refused global or opcode on a later line; that line is the reason given.
    """
    lines = [line.strip() for line in str(exc).splitlines()]
    if not lines or not lines[0].startswith("Weights only load failed"):
        return first_line(exc)
    reason = [line for line in lines[1:] if line and not line.startswith(
        ("Please file an issue", "Check the documentation"))]
    return " ".join(reason) if reason else lines[0]


def safe_torch_load(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with a one-line error for missing or bad files."""
    import torch  # here: the command line imports this module before it needs torch

    try:
        with warnings.catch_warnings():  # torch warns on stderr of a pickle protocol other than 2
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise EENetError(f"{what} not found: {path}") from None
    except Exception as exc:  # truncated file, foreign pickle, wrong format
        raise EENetError(f"cannot load {path} safely (weights_only=True): "
                         f"{_torch_load_reason(exc)}") from exc


#: The only globals :func:`safe_pickle_load` rebuilds: numpy arrays, dtypes and scalars
#: (numpy 1 pickles name ``numpy.core``, numpy 2 ``numpy._core``) and the bytes codec.
PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
      for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
})


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load global '{module}.{name}': only "
                                         f"plain values and numpy arrays are read")
        if module.startswith("numpy.core."):  # numpy 2 moved it (and warns on the old name)
            import numpy as np

            if hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def safe_pickle_load(file: BinaryIO, encoding: str = "ASCII") -> Any:
    """``pickle.load(file)`` that rebuilds only plain Python values and numpy arrays.

    Raises ``pickle.UnpicklingError`` for any other global the pickle names; nothing
    it names is imported or called.
    """
    return _DataUnpickler(file, encoding=encoding).load()


def json_float(v: float) -> float | str:
    """JSON has no infinity: write ``"inf"`` / ``"-inf"`` (``float()`` reads them back)."""
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")
