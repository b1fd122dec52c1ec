"""The data set registry: one :class:`DatasetSpec` record per data set, beside its loader.

After timm's ``_registry.py`` (each model's metadata lives with its entry
point): every loader module describes each of its data sets with one frozen
record (loader, accepted options, classes, channels, size, normalisation,
whether torchvision can download it, the missing-files check) and registers
it with :func:`register_dataset` right below the loader. No other table keyed
by data set name exists; :mod:`eenet.data.datasets` imports the loader modules
and answers every question (``load_split``, ``dataset_info``, ``list_datasets``,
``missing_files``) from these records.

This module imports no loader, so every loader can import it without an
import cycle. It is also the one home of what the loaders share: the root
folder check (:func:`root_path`, :func:`check_folder`: none given, a symlink
loop, a file, a folder that cannot be read), the missing-files error
(:func:`require_files`, :func:`ensure_files`), the class checks of every data
set (:func:`check_num_classes`: the configured ``num_classes`` against the
record's fixed count or the class folders found; :func:`check_labels`: the
loaded labels lie in ``0..num_classes-1``), one-line error text
(:func:`one_line`) and the sample selection that lets image folders decode
only the files they keep (:func:`check_selection`).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch

from eenet.errors import EENetError

__all__ = [
    "DatasetSpec",
    "Select",
    "check_folder",
    "check_labels",
    "check_num_classes",
    "check_selection",
    "ensure_files",
    "one_line",
    "register_dataset",
    "registered",
    "require_files",
    "root_path",
]

#: ``select(n)`` -> positions (1-D integer tensor) of the samples to keep out of a split of n.
Select = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything eenet knows about one data set, in one record.

    Attributes:
        name: the name of ``dataset.datamodule.name`` and :func:`eenet.data.load_split`.
        loader: ``loader(root, train, download, **options) -> (images, labels)``.
        num_classes: number of classes; ``None`` when the files decide (imagefolder).
        in_chans: image channels of the loaded tensors.
        size: ``(H, W)`` of the loaded images; ``None`` when the files decide.
        mean: per-channel normalisation mean (the data module's default); ``None``
            when there is no standard one (imagefolder: any images).
        std: per-channel normalisation standard deviation, as ``mean``.
        options: keyword options the loader accepts.
        missing: ``missing(base, train)`` -> the needed paths (relative to ``base``)
            that are absent; ``None`` for a data set that reads no files (digits).
        downloadable: torchvision can fetch the files (``download=True``).
        how_to_get: what to do about missing files that cannot be downloaded
            (ends the one-line missing-files error).
        find_classes: ``find_classes(base)`` -> ``(class names, folder they were
            read from)`` for a data set whose files decide its classes (image
            folders); it checks that every split holds the same classes, and
            the files it needs must be there (:func:`require_files`) before it
            is called. ``None``: the classes are ``num_classes``, fixed.
        decodes_subset: the loader takes ``select=`` (:data:`Select`) and decodes
            only the chosen samples (image folders: the labels come from folder
            names, so the split's size is known before anything is decoded).
        resolve_info: ``resolve_info(root, options)`` -> the facts (of
            ``num_classes``, ``in_chans``, ``size``) that depend on the files or
            on the options, overriding the static ones.
        note: a caveat reported by :func:`eenet.data.dataset_info` (e.g. "a small subset").
        value_range: ``(low, high)`` of the loaded values before normalisation (images:
            ``(0, 1)``); ``None`` when not bounded (audio features). An exported network
            records it, so its runner can refuse raw inputs on another scale.
    """

    name: str
    loader: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    num_classes: int | None
    in_chans: int
    size: tuple[int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    options: tuple[str, ...] = ()
    missing: Callable[[Path, bool], list[str]] | None = None
    downloadable: bool = False
    how_to_get: str = "put the files there"
    find_classes: Callable[[Path], tuple[list[str], Path]] | None = None
    decodes_subset: bool = False
    resolve_info: Callable[[str | os.PathLike | None, Mapping[str, Any]],
                           dict[str, Any]] | None = None
    note: str | None = None
    value_range: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"dataset record '{self.name}': give both mean and std, or neither")
        for values in (self.mean, self.std):
            if values is not None and len(values) != self.in_chans:
                raise ValueError(f"dataset record '{self.name}': {len(values)} normalisation "
                                 f"values for {self.in_chans} channel(s)")


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry (beside its loader) and return it.

    Raises:
        ValueError: a data set of that name is already registered.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset '{spec.name}' is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> Mapping[str, DatasetSpec]:
    """The records registered so far, by name (read-only).

    Complete only once every loader module is imported: ask
    :mod:`eenet.data.datasets`, which imports them all.
    """
    return MappingProxyType(_REGISTRY)


# ----------------------------------------------------------------------------- shared helpers


def one_line(error: BaseException) -> str:
    """An exception's whole message on one line (whitespace runs become one space).

    Not :func:`eenet.io.first_line`: the messages of failed downloads and
    decoders carry their cause after a line break (``"Name or service\\nnot
    known"``), which the first line alone would drop.
    """
    return " ".join(str(error).split()) or type(error).__name__


def check_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`, refused in one line if it cannot be a readable folder.

    A path that does not exist passes (a download may create it; otherwise the
    missing-files check names what is absent). Refused: a symlink loop (a link
    that leads back to itself), a file where the folder should be (the path
    itself or one of its parents), a folder that cannot be listed (permission).

    Args:
        path: the folder.
        what: how the message names it (``"data_root"``, ``"dataset 'mnist': root"``).
    """
    folder = Path(path).expanduser()
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        return folder
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise EENetError(f"{what} {folder} is a symlink loop (a link leads back to itself); "
                             f"point it at a real folder") from error
        if error.errno == errno.ENOTDIR:
            parent = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
            raise EENetError(f"{what} {folder} is not a folder: {parent or 'a parent'} is a file; "
                             f"point it at the data folder") from error
        raise EENetError(f"{what} {folder} cannot be used: {one_line(error)}") from error
    if not stat.S_ISDIR(mode):
        raise EENetError(f"{what} {folder} is a file, not a folder; point it at the data folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise EENetError(f"{what} {folder} cannot be read (permission denied); make it readable "
                         f"(chmod u+rx) or point it at another folder")
    return folder


def root_path(name: str, root: str | os.PathLike | None) -> Path:
    """``root`` as a path; one-line error when a data set that reads files got none or a bad one.

    See :func:`check_folder` for what is refused.
    """
    if root is None or str(root) == "":
        raise EENetError(f"dataset '{name}' needs a root folder (root=...), got none")
    return check_folder(root, f"dataset '{name}': root")


def _raise_missing(spec: DatasetSpec, base: Path, missing: Sequence[str]) -> None:
    if missing:
        hint = ("download=true fetches them" if spec.downloadable
                else f"this data set cannot be downloaded, {spec.how_to_get}")
        raise EENetError(f"dataset '{spec.name}': missing {', '.join(missing)} under {base}; "
                         f"{hint}")


def require_files(spec: DatasetSpec, base: Path, train: bool) -> None:
    """Fail in one line naming every file ``spec`` needs under ``base`` that is absent."""
    if spec.missing is not None:
        _raise_missing(spec, base, spec.missing(base, train))


def ensure_files(spec: DatasetSpec, base: Path, train: bool, download: bool,
                 fetch: Callable[[], Any]) -> None:
    """As :func:`require_files`, but first run ``fetch`` (a torchvision download) when allowed.

    A failed download (no network, bad checksum) is a one-line error too.
    """
    if spec.missing is None or not spec.missing(base, train):
        return
    if download and spec.downloadable:
        try:
            fetch()
        except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
            raise EENetError(f"could not download dataset '{spec.name}': "
                             f"{one_line(error)}") from error
    require_files(spec, base, train)


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def check_num_classes(spec: DatasetSpec, root: str | os.PathLike | None,
                      num_classes: int | None) -> int | None:
    """The configured ``num_classes`` against the data set's own class count, in one line.

    A data set with fixed classes (every record but image folders) is checked
    against its record without reading a file. One whose files decide
    (``spec.find_classes``) needs its files (:func:`require_files`, the training
    split's) and is checked against the class folders found, which must agree
    across splits.

    Returns:
        The data set's class count (``None`` when ``num_classes`` is ``None`` and
        the files decide: nothing is read then).
    """
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 1):
        raise EENetError(f"num_classes must be a positive integer or null, got {num_classes!r}")
    if spec.find_classes is None:
        if num_classes is not None and spec.num_classes is not None \
                and num_classes != spec.num_classes:
            raise EENetError(f"dataset '{spec.name}' has {spec.num_classes} classes but "
                             f"num_classes={num_classes}; set dataset.num_classes="
                             f"{spec.num_classes}")
        return spec.num_classes
    if num_classes is None:
        return None
    base = root_path(spec.name, root)
    require_files(spec, base, True)
    names, folder = spec.find_classes(base)
    if len(names) != num_classes:
        raise EENetError(f"dataset '{spec.name}': {len(names)} class folder(s) found in {folder} "
                         f"({_names(names)}) but num_classes={num_classes}; set "
                         f"dataset.num_classes={len(names)} or add the missing class folders")
    return len(names)


def check_labels(spec: DatasetSpec, root: str | os.PathLike | None, labels: torch.Tensor,
                 num_classes: int | None) -> None:
    """Loaded labels must be class indices ``0..num_classes-1`` (a foreign or corrupt file is not)."""
    if num_classes is None or labels.numel() == 0:
        return
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        values = _names([str(v) for v in bad.unique().tolist()], limit=5)
        where = f" under {root}" if root is not None and spec.missing is not None else ""
        raise EENetError(f"dataset '{spec.name}': the files{where} hold label(s) {values} outside "
                         f"0..{num_classes - 1} ({num_classes} classes); they are not this data "
                         f"set's files, or they are damaged")


def check_selection(select: Select, n: int) -> torch.Tensor:
    """``select(n)`` as an int64 index tensor, checked to lie in ``[0, n)``."""
    positions = torch.as_tensor(select(n))
    if positions.ndim != 1 or (positions.numel() and (
            torch.is_floating_point(positions) or positions.dtype == torch.bool)):
        raise EENetError(f"a sample selection must be 1-D integer positions, got "
                         f"{positions.dtype} of shape {tuple(positions.shape)}")
    positions = positions.to(torch.int64)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
        raise EENetError(f"a sample selection holds positions outside 0..{n - 1} "
                         f"(min {int(positions.min())}, max {int(positions.max())})")
    return positions
