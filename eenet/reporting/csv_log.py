"""The run folder's CSV logger: Lightning's ``CSVLogger`` that keeps a resumed run's history.

Lightning 2.6's CSV experiment writer deletes an existing ``metrics.csv`` when it is
created (``lightning.fabric.loggers.csv_logs._ExperimentWriter._check_log_dir_exists``),
so ``eenet-train resume=true`` would lose every row the run logged before it stopped.
:class:`RunCSVLogger` takes ``append``:

- ``append=True`` (``conf/logger/csv.yaml`` sets it to the run's ``resume``): an existing
  ``metrics.csv`` is kept and the new rows are appended to it. Its header is read first,
  so a metric the earlier rows did not have extends the header (Lightning's writer then
  rewrites the file once with the new columns; the earlier rows keep their values and
  leave the new columns empty). Rows the interrupted attempt logged after its last
  checkpoint stay too: they are what happened, and their ``step`` repeats in the rows of
  the resumed attempt that trains those steps again.
- ``append=False`` (a run that is not resumed): as Lightning, the writer starts a new
  file. No earlier run's rows are kept: eenet-train only writes into a folder holding
  ``csv/`` when it continues that run (``resume=true``) or replaces it
  (``overwrite=true``, which removes ``csv/`` first; see :mod:`eenet.run_folder`), and a
  new run must not carry the rows of an unrelated earlier attempt.

Where there is no ``metrics.csv`` both behave as Lightning's ``CSVLogger``.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from eenet.errors import EENetError


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV experiment writer that, with ``append``, keeps an existing
    ``metrics.csv`` and continues it under its own header."""

    def __init__(self, log_dir: str, append: bool) -> None:
        self._append = append  # read by _check_log_dir_exists, which the base __init__ calls
        super().__init__(log_dir=log_dir)
        if append and self._fs.isfile(self.metrics_file_path):
            self.metrics_keys = self._existing_header()

    def _existing_header(self) -> list[str]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            return next(csv.reader(file), [])

    def _check_log_dir_exists(self) -> None:
        if not self._append:
            super()._check_log_dir_exists()  # Lightning's: warn, then delete metrics.csv


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that, with ``append=True``, appends to an existing
    ``metrics.csv`` instead of deleting it (see the module docstring).

    Args:
        append: keep an existing ``metrics.csv`` and add to it (a resumed run).
        **kwargs: Lightning's ``CSVLogger`` arguments (``save_dir``, ``name``, ``version``, ...).
    """

    def __init__(self, save_dir: str, append: bool = False, **kwargs: Any) -> None:
        if not isinstance(append, bool):
            raise EENetError(f"logger.csv.append={append!r} must be true or false")
        super().__init__(save_dir, **kwargs)
        self._append = append

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        """The experiment writer, made on first use (as Lightning's)."""
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir, append=self._append)
        return self._experiment
