"""Output folders of the jobs: never clobbered, marked while incomplete, one writer at a time.

``eenet-train``, ``eenet-eval`` and ``eenet-export`` (and the functions behind them)
write into their output folder only after :func:`claim_output_folder` accepted it:

- **What a folder may hold.** A new or empty folder is always accepted. A folder that
  holds a job's outputs is refused unless the user says what to do with them:
  ``overwrite=true`` replaces them (the job's own outputs are removed just before it
  writes its first file), ``resume=true`` (training only) continues the run that is
  there. eenet-eval and eenet-export write into a new or empty folder only; eenet-train
  accepts files that are not its own beside its outputs.
- **Incomplete folders.** The marker file :data:`MARKER` (``INCOMPLETE``) is created
  first and removed last, after ``results.json`` (``manifest.json`` for an export),
  which the jobs write after every other file. A folder a job creates appears with
  its marker already inside (made under a temporary name, then renamed), so a
  process killed at any moment leaves no folder or a folder that says it is
  incomplete. A rerun of eenet-eval or eenet-export replaces an incomplete folder of
  its own job; an incomplete training run is continued with ``resume=true`` (or
  replaced with ``overwrite=true``).
- **One writer.** The marker is also the lock: the writer holds ``fcntl.flock``
  (exclusive) on it for as long as it writes, and a second writer that finds the lock
  taken refuses in one line. The kernel drops a flock when its process ends, by
  SIGKILL too, so a lock cannot go stale: a marker whose lock is free is the trace of
  a writer that died, never of a live one. (On NFS, Linux maps flock to POSIX record
  locks, which need the NFS lock service.)
- **A refusal writes nothing.** The checks only read. What this process created for a
  job that was then refused (the folder, its missing parents, the marker) is removed
  again by :func:`abandon_all`, which the entry points call on every refusal; only
  what this process created, and only while nothing else is in it. Nothing that
  existed before the process started is removed.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from eenet.errors import EENetError

#: The marker of an incomplete folder, and the writer's lock.
MARKER = "INCOMPLETE"
# the marker's name while it is being made (not an entry of the folder: see _entries)
_TMP_PREFIX = f".{MARKER}."

# Folders and markers this process created and still holds, by absolute path.
_HELD: dict[str, "OutputFolder"] = {}


def _key(path: str | Path) -> str:
    return os.path.abspath(path)


def _names(entries, limit: int = 4) -> str:
    entries = list(entries)
    more = f", ... ({len(entries)} in all)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def _strerror(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _marker_text(job: str) -> str:
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    return (f"{job} started writing this folder and has not finished: while this file is here "
            f"the folder is incomplete (a rerun of {job} takes it over; see eenet/run_folder.py)."
            f"\njob: {job}\npid: {os.getpid()}\nhost: {socket.gethostname()}\n"
            f"started: {started}\n")


def read_marker(folder: str | Path) -> dict[str, str]:
    """The ``key: value`` lines of a folder's marker ({} when it has none or it is unreadable)."""
    try:
        text = (Path(folder) / MARKER).read_text(errors="replace")
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines()[1:]:
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _is_locked(marker: Path) -> bool:
    """True when another open file holds the lock of ``marker`` (a writer is alive)."""
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock taken for the test
    return False


def _entries(folder: Path) -> dict[str, tuple[bool, int, int]]:
    """The folder's entries without the marker: name -> (is a folder, mtime_ns, size)."""
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.name != MARKER and not e.name.startswith(_TMP_PREFIX):
                st = e.stat(follow_symlinks=False)
                out[e.name] = (e.is_dir(follow_symlinks=False), st.st_mtime_ns, st.st_size)
    return out


def _make_parents(folder: Path, key: str, target: Path) -> list[Path]:
    """Create the missing parents of ``folder`` and ``folder``'s parent chain up to it;
    returns the ones this call created, outermost first."""
    missing = []
    p = folder
    while not p.exists():
        if p.is_symlink():  # a dangling symlink: mkdir would fail on it
            break
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise EENetError(f"output folder {target} is not writable: {p} is a file, not a "
                         f"folder; choose another folder: {key}=DIR")
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue  # made by another process meanwhile: not ours
        except OSError as exc:
            _remove_empty(created)
            raise EENetError(f"output folder {target} is not writable: {_strerror(exc)} "
                             f"({d.parent}); choose a folder you can write to: "
                             f"{key}=DIR") from None
        created.append(d)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (outermost first), innermost first, each only while it is empty."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            return


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_marker(fd: int, job: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _marker_text(job).encode(), 0)
    os.fsync(fd)


def _new_marker(folder: Path, job: str) -> int | None:
    """Create ``folder/INCOMPLETE``, written and locked before it appears under its name
    (made under a temporary name, then hard-linked, which fails if it exists); returns
    its descriptor, or None when a marker is there already."""
    tmp = folder / f"{_TMP_PREFIX}{os.getpid()}.{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    linked = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else can hold it
        _write_marker(fd, job)
        try:
            os.link(tmp, folder / MARKER)
            linked = True
            return fd
        except FileExistsError:
            return None
        except OSError:
            pass  # no hard links on this file system: made under its name below
    finally:
        if not linked:
            os.close(fd)
        tmp.unlink()
    try:
        fd = os.open(folder / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)  # unlocked for an instant after it appeared: the only
    _write_marker(fd, job)  # difference from the hard-link way
    return fd


@dataclass(eq=False)
class OutputFolder:
    """A job's claim on its output folder (see the module docstring).

    Use it as a context manager around the writes: leaving it normally calls
    :meth:`done` (the marker goes, the folder is complete), leaving it with an
    exception calls :meth:`abandon`.
    """

    path: Path
    job: str
    fd: int | None = None
    created_marker: bool = False
    created_dirs: list[Path] = field(default_factory=list)
    replacing: bool = False
    before: dict = field(default_factory=dict)

    def _marker_is_ours(self) -> bool:
        try:
            a, b = os.stat(self.path / MARKER), os.fstat(self.fd)
        except (OSError, TypeError):
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def clear(self, patterns) -> None:
        """Before the first write into a folder being replaced (``overwrite=true``, or an
        incomplete folder of the same job): remove the job's earlier outputs (names or
        glob patterns) and the temporary files of an interrupted atomic write. Does
        nothing in a new folder or when a run is continued."""
        if not self.replacing:
            return
        self.replacing = False
        temporaries = [f".{p}.*.tmp" for p in patterns]
        for name in sorted(os.listdir(self.path)):
            if name == MARKER or not any(fnmatch.fnmatchcase(name, p)
                                         for p in (*patterns, *temporaries)):
                continue
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def done(self) -> None:
        """The folder is complete: remove the marker and let go of the lock."""
        if self.fd is None:
            return
        if self._marker_is_ours():
            (self.path / MARKER).unlink()
        self._release()

    def abandon(self) -> None:
        """The job stopped before it finished. When it wrote nothing, what this claim
        created (the marker, the folder, its parents) is removed; otherwise the marker
        stays and says the folder is incomplete."""
        if self.fd is None:
            return
        try:
            untouched = _entries(self.path) == self.before
        except OSError:
            untouched = False
        if untouched and self.created_marker and self._marker_is_ours():
            (self.path / MARKER).unlink()
        self._release()
        if untouched:
            _remove_empty(self.created_dirs)

    def _release(self) -> None:
        os.close(self.fd)  # drops the lock
        self.fd = None
        _HELD.pop(_key(self.path), None)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.done()
        else:
            self.abandon()


def _create_marked(path: Path, job: str, key: str) -> OutputFolder | None:
    """Create ``path`` with its marker inside, locked; None when ``path`` exists already.

    The folder is made under a temporary name and renamed into place, so it never
    exists without its marker.
    """
    created = _make_parents(path.parent, key, path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.new"
    try:
        os.mkdir(tmp)
    except OSError as exc:
        _remove_empty(created)
        raise EENetError(f"output folder {path} is not writable: {_strerror(exc)} "
                         f"({path.parent}); choose a folder you can write to: {key}=DIR") from None
    try:
        fd = _new_marker(tmp, job)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise EENetError(f"output folder {path} is not writable: {_strerror(exc)}; choose "
                         f"a folder you can write to: {key}=DIR") from None
    try:
        if path.exists() or path.is_symlink():
            raise FileExistsError
        os.rename(tmp, path)  # fails when another process made a non-empty `path` meanwhile
    except OSError:
        os.close(fd)
        (tmp / MARKER).unlink()
        tmp.rmdir()
        _remove_empty(created)
        return None
    folder = OutputFolder(path, job, fd=fd, created_marker=True, created_dirs=[*created, path])
    _HELD[_key(path)] = folder
    return folder


def create_output_folder(path: str | Path, job: str, key: str = "hydra.run.dir") -> bool:
    """Create ``path`` for ``job`` with its marker inside, before the job starts (the
    command line calls it before Hydra would make the folder empty). The job's
    :func:`claim_output_folder` then takes it over. Returns False when ``path``
    exists already (nothing is done: the job's claim decides)."""
    path = Path(path)
    held = _HELD.get(_key(path))
    if held is not None and held.fd is not None:
        return True
    if path.exists() and not path.is_dir():
        raise EENetError(f"{key}={path} is a file, not a folder; give a folder: {key}=DIR")
    return not path.exists() and _create_marked(path, job, key) is not None


def create_parents(path: str | Path, key: str) -> None:
    """Create ``path`` and its missing parents, remembered as this process's own: they are
    removed again by :func:`abandon_all` while empty (a sweep's folder)."""
    path = Path(path)
    created = _make_parents(path, key, path)
    if created:
        _HELD[_key(path)] = OutputFolder(path, "", created_dirs=created)


def created_here(path: str | Path) -> bool:
    """True when this process created ``path`` or one of its parents (see :func:`create_parents`)."""
    path = Path(os.path.abspath(path))
    return any(Path(k) == path or Path(k) in path.parents for k, f in _HELD.items()
               if f.created_dirs)


def mark_new_folder(path: str | Path, job: str) -> None:
    """Put the locked marker into an empty folder made for this process a moment ago
    (a sweep job's folder, made by Hydra); it is then this process's own, like a
    folder from :func:`create_output_folder`."""
    path = Path(path)
    if _key(path) in _HELD or any(path.iterdir()):
        return
    fd = _new_marker(path, job)
    if fd is None:
        return
    _HELD[_key(path)] = OutputFolder(path, job, fd=fd, created_marker=True, created_dirs=[path])


def abandon_all(parents: bool = True) -> None:
    """Abandon every folder this process holds (:meth:`OutputFolder.abandon`): called by
    the entry points when a job stops before it finished, on a refusal in particular.
    ``parents``: also the folders of :func:`create_parents` (a sweep's), while empty."""
    for folder in list(_HELD.values()):
        if folder.fd is not None:
            folder.abandon()
        elif parents:
            _HELD.pop(_key(folder.path), None)
            _remove_empty(folder.created_dirs)


def claim_output_folder(path: str | Path, job: str, outputs, *, key: str = "hydra.run.dir",
                        others_allowed: bool = False, restart_incomplete: bool = True,
                        overwrite: bool = False, resume: bool = False) -> OutputFolder:
    """Check that ``job`` may write into ``path`` and claim it: marker written, lock held.

    Args:
        path: the output folder (created, with its marker, when it does not exist).
        job: the job's name, as the user knows it (``eenet-eval``).
        outputs: the names (or glob patterns) of the files and folders the job writes.
        key: the option that names the folder, for the messages (``hydra.run.dir``, ``out``).
        others_allowed: files that are not the job's outputs may be in the folder.
        restart_incomplete: an incomplete folder of the same job is replaced without
            ``overwrite``.
        overwrite: replace what the folder holds (``overwrite=true``).
        resume: continue the run the folder holds (``resume=true``; training).

    Raises:
        EENetError: one line saying what the folder holds and what is accepted; nothing
            was written.
    """
    path = Path(path)
    held = _HELD.get(_key(path))
    if held is not None and held.fd is not None:  # made by this process for this job
        held.job = job
        return held
    if path.exists() and not path.is_dir():
        raise EENetError(f"{key}={path} is a file, not a folder; give a folder: {key}=DIR")
    if not path.exists():
        folder = _create_marked(path, job, key)
        if folder is not None:
            return folder
        if not path.is_dir():
            raise EENetError(f"{key}={path} is a file, not a folder; give a folder: {key}=DIR")
    try:
        before = _entries(path)
    except OSError as exc:
        raise EENetError(f"cannot read the output folder {path}: {_strerror(exc)}; choose "
                         f"another folder: {key}=DIR") from None
    marker = path / MARKER
    has_marker = marker.is_file()
    replacing = _decide(path, job, outputs, key, before, has_marker, others_allowed,
                        restart_incomplete, overwrite, resume)
    try:
        fd = os.open(marker, os.O_RDWR) if has_marker else _new_marker(path, job)
    except FileNotFoundError:  # the stale marker went meanwhile
        fd = None
    except OSError as exc:
        raise EENetError(f"output folder {path} is not writable: {_strerror(exc)}; choose "
                         f"a folder you can write to: {key}=DIR") from None
    if fd is None or not _lock(fd):  # (locking again a descriptor that holds the lock is a no-op)
        if fd is not None:
            os.close(fd)
        raise _busy(path, key)
    folder = OutputFolder(path, job, fd=fd, created_marker=not has_marker, replacing=replacing,
                          before=before)
    # under the lock: the folder must still be what was checked (another writer may have
    # finished in between, or removed the marker this process opened)
    if not folder._marker_is_ours() or _entries(path) != before:
        folder.abandon()
        raise EENetError(f"{path} changed while {job} was checking it (another process "
                         f"writes into it?); choose another folder: {key}=DIR")
    _write_marker(fd, job)
    _HELD[_key(path)] = folder
    return folder


def _busy(path: Path, key: str) -> EENetError:
    m = read_marker(path)
    who = m.get("job", "another process")
    where = f" (pid {m['pid']} on {m.get('host', '?')}, since {m.get('started', '?')})" \
        if "pid" in m else ""
    return EENetError(f"{path} is being written by another {who}{where}; wait for it to "
                      f"finish or choose another folder: {key}=DIR")


def _decide(path: Path, job: str, outputs, key: str, entries: dict, has_marker: bool,
            others_allowed: bool, restart_incomplete: bool, overwrite: bool,
            resume: bool) -> bool:
    """Refuse (one line) or accept the folder; True when its contents are to be replaced."""
    if has_marker:
        if _is_locked(path / MARKER):
            raise _busy(path, key)
        other = read_marker(path).get("job", "an unknown job")
        if other == job and resume:
            return False
        if overwrite or (other == job and restart_incomplete):
            return True
        if other != job:
            raise EENetError(f"{path} holds the incomplete output of {other} ({MARKER} is "
                             f"there: it stopped before it finished); choose another folder "
                             f"({key}=DIR), or replace it with overwrite=true")
        raise EENetError(f"{path} holds a started {job} run that did not finish ({MARKER} is "
                         f"there); continue it with resume=true, replace it with "
                         f"overwrite=true, or choose another folder: {key}=DIR")
    rank = {n: next((i for i, p in enumerate(outputs) if fnmatch.fnmatchcase(n, p)), None)
            for n in entries}
    own = sorted((n for n in entries if rank[n] is not None), key=lambda n: (rank[n], n))
    holds = own if others_allowed else own + sorted(n for n in entries if rank[n] is None)
    if not holds:
        return False
    if resume:
        return False
    if overwrite:
        return True
    if others_allowed:
        raise EENetError(f"{path} already holds an {job} run ({_names(holds)}); continue it "
                         f"with resume=true, replace it with overwrite=true, or choose another "
                         f"folder: {key}=DIR")
    raise EENetError(f"{path} is not empty (it holds {_names(holds)}); {job} writes into a new "
                     f"or empty folder: choose another ({key}=DIR), or replace its outputs "
                     f"with overwrite=true")
