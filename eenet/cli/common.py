"""What every entry point shares: one line and exit code 2 for a user's mistake.

A mistake is caught at one of three moments, and each prints a single line
``error: ...`` on stderr and exits with code 2:

1. before Hydra starts: :func:`eenet.config.check_command_line` reads ``sys.argv``
   (a missing config folder, a user's file Hydra would ignore, an unknown
   ``group=option``);
2. while Hydra composes the config (broken YAML, bad override syntax, a key that is
   not in the config): Hydra prints these over many lines, or as a traceback, and
   exits with code 1; :func:`prepare_command_line` makes them one line;
3. in the job: an :class:`~eenet.errors.EENetError`, or a key of the user's config
   that the class it configures does not take (:func:`run_job`).

``HYDRA_FULL_ERROR=1`` shows the full traceback instead, at every moment. An error
of eenet's own (a bug) is not a user's mistake and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

from omegaconf import DictConfig

from eenet.config import check_command_line
from eenet.errors import EENetError
from eenet.io import first_line

T = TypeVar("T")

# Set by prepare_command_line (a command-line process) and run_job (its Hydra job started).
_started: float | None = None
_job_started = False

# What Python says when a call gets a keyword its target does not take, or lacks one.
_SIGNATURE_MISMATCH = re.compile(r"unexpected keyword argument|missing \d+ required "
                                 r"(keyword-only |positional )?argument")


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(exc: BaseException) -> NoReturn:
    """Print ``error: <exc>`` and exit with code 2 (re-raise with ``HYDRA_FULL_ERROR=1``)."""
    if _full_error():
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def config_error(exc: BaseException) -> EENetError | None:
    """One line for a mistake in a config's contents found while the job builds from it.

    - a key a constructor does not take, or a missing argument, reported by Hydra's
      ``instantiate`` (``InstantiationException`` caused by such a ``TypeError``);
    - a key the job needs that the config does not have, or leaves ``???`` (OmegaConf's
      ``ConfigAttributeError``, ``ConfigKeyError``, ``MissingMandatoryValue``).

    None for anything else, which keeps its traceback.
    """
    from hydra.errors import InstantiationException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    if isinstance(exc, InstantiationException) and isinstance(exc.__cause__, TypeError) \
            and _SIGNATURE_MISMATCH.search(str(exc.__cause__)):
        lines = str(exc).splitlines()
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")),
                   None)
        where = f"{key}: " if key else ""
        return EENetError(f"{where}{exc.__cause__} ({lines[0].rstrip(':').lower()}); check "
                          f"the keys of that config")
    if isinstance(exc, (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue)):
        return EENetError(f"config key {exc.full_key}: {first_line(exc)}")
    return None


def _remove_empty_output_dir() -> None:
    """Remove the folder Hydra made for a job that stopped on a user's mistake, if it is empty.

    Hydra creates ``hydra.run.dir`` (and its missing parents) before the job runs. The
    folder is removed, and then its parents, only while each is empty, was changed after
    this process started and is not the working folder or one of its parents: an empty
    ``hydra.run.dir`` that existed before stays. (An empty parent that existed before and
    got the new folder counts as changed, and goes too; it held nothing.)
    """
    from hydra.core.hydra_config import HydraConfig

    if _started is None or not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    keep = Path.cwd().resolve()
    while folder != keep and folder not in keep.parents:
        try:
            if any(folder.iterdir()) or folder.stat().st_ctime < _started:
                return
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def run_job(job: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run ``job(cfg)``; a user's mistake prints one line and exits with code 2.

    Inside a Hydra job, the empty output folder Hydra made for it is then removed
    (nothing is left behind by a refused command). ``HYDRA_FULL_ERROR=1`` lets the
    traceback through instead.
    """
    global _job_started
    from hydra.core.hydra_config import HydraConfig

    _job_started = _job_started or HydraConfig.initialized()
    try:
        return job(cfg)
    except EENetError as exc:
        error: BaseException = exc
    except Exception as exc:
        error = config_error(exc)
        if error is None:
            raise
        error.__cause__ = exc
    if not _full_error():
        _remove_empty_output_dir()
    fail(error)


def _cause(exc: BaseException, kind: type) -> Any:
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def hydra_error_line(exc: BaseException) -> str:
    """One line for an error Hydra raises while it composes the config.

    Hydra's messages run over several lines (a list of options, the search path, a
    link to its grammar); YAML errors name the file, line and column.
    """
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    bad_yaml = _cause(exc, yaml.MarkedYAMLError)
    if bad_yaml is not None:
        mark = bad_yaml.problem_mark or bad_yaml.context_mark
        where = (f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark
                 else "a config file")
        what = "; ".join(s for s in (bad_yaml.context, bad_yaml.problem) if s)
        return f"{where}: not valid YAML ({what})"
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith(("Config search path", "Available options", "See https://")):
            break
        if line:
            lines.append(line)
    text = " ".join(lines) or type(exc).__name__
    if getattr(exc, "options", None):
        text += f"; accepted: {', '.join(exc.options)}"
    if isinstance(exc.__cause__, OmegaConfBaseException):
        text += f" ({first_line(exc.__cause__)})"
    return text


def _one_line_hydra_errors() -> None:
    """Make the errors Hydra reports before the job starts one line each, with exit code 2.

    ``hydra.main`` runs each step (adding ``--config-dir``, composing, running the job)
    through ``hydra._internal.utils.run_and_report``, which prints the error over many
    lines and exits with code 1. The step is wrapped so that an error raised before the
    job started becomes :func:`fail`'s one line; errors of the job itself, and every
    error under ``HYDRA_FULL_ERROR=1``, go on to Hydra's own report.
    """
    import hydra._internal.utils as hydra_utils

    report = getattr(hydra_utils, "run_and_report", None)
    if report is None or getattr(report, "_eenet", False):
        return  # another Hydra version (it then reports as it does), or already wrapped

    def run_and_report(func: Callable[[], Any]) -> Any:
        def step() -> Any:
            try:
                return func()
            except Exception as exc:
                if _job_started or _full_error():
                    raise
                fail(EENetError(hydra_error_line(exc)))

        return report(step)

    run_and_report._eenet = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report


def prepare_command_line() -> None:
    """Before Hydra starts: check ``sys.argv``, make Hydra's errors one line, quiet warnings
    that are not the user's business."""
    global _started
    _started = time.time()
    # fvcore's import scripts its focal loss, which torch reports as deprecated
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    try:
        check_command_line(sys.argv[1:])
    except EENetError as exc:
        fail(exc)
    _one_line_hydra_errors()
