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

A refused command leaves nothing behind, by one mechanism: the job's output folder
is made by :mod:`eenet.run_folder` (with its ``INCOMPLETE`` marker inside, before
Hydra would make it empty; :class:`OutputFolderCallback`), which remembers what this
process created, and :func:`run_job` gives it all back
(:func:`eenet.run_folder.abandon_all`) when the job stops early: what is still empty
is removed, nothing that existed before the process started.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any, Callable, NoReturn, TypeVar

from omegaconf import DictConfig

from hydra.experimental.callback import Callback

from eenet import run_folder
from eenet.config import check_command_line
from eenet.errors import EENetError
from eenet.io import first_line

T = TypeVar("T")

# Set by run_job: the Hydra job started (errors are then the job's, not Hydra's).
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


class OutputFolderCallback(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): the job's output folder is made by
    :mod:`eenet.run_folder`, with its ``INCOMPLETE`` marker (and lock) inside, before
    Hydra's own ``mkdir`` (which then finds it), so that a process killed at any moment
    leaves no folder or a marked one, and a refused job's folder is removed again.

    A sweep's folder (and its missing parents) is made the same way; each job's folder
    inside it is made by Hydra and marked at once when the sweep folder is this
    process's own.
    """

    @staticmethod
    def _job(config: DictConfig) -> str:
        return f"eenet-{config.hydra.job.config_name}"

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        folder = str(config.hydra.run.dir)
        with read_write(config), open_dict(config):
            config.hydra.run.dir = folder  # the folder made here is the one Hydra uses
        try:
            run_folder.create_output_folder(folder, self._job(config), key="hydra.run.dir")
        except EENetError as exc:
            fail(exc)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        folder = str(config.hydra.sweep.dir)
        with read_write(config), open_dict(config):
            config.hydra.sweep.dir = folder
        try:
            run_folder.create_parents(folder, key="hydra.sweep.dir")
        except EENetError as exc:
            fail(exc)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        folder = config.hydra.runtime.output_dir
        if config.hydra.mode == RunMode.MULTIRUN and run_folder.created_here(folder):
            run_folder.mark_new_folder(folder, self._job(config))


def run_job(job: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run ``job(cfg)``; a user's mistake prints one line and exits with code 2.

    Whenever the job stops before it finished (a refusal, a bug, Ctrl-C), what this
    process created for its output folder and that is still empty is removed
    (:func:`eenet.run_folder.abandon_all`); a folder the job wrote into keeps its
    ``INCOMPLETE`` marker. ``HYDRA_FULL_ERROR=1`` lets the traceback through instead of
    the one line.
    """
    global _job_started
    from hydra.core.hydra_config import HydraConfig

    _job_started = _job_started or HydraConfig.initialized()
    try:
        result = job(cfg)
    except EENetError as exc:
        error: BaseException = exc
    except Exception as exc:
        error = config_error(exc)
        if error is None:
            run_folder.abandon_all()
            raise
        error.__cause__ = exc
    except BaseException:  # Ctrl-C, sys.exit
        run_folder.abandon_all()
        raise
    else:  # e.g. a folder made for the job that it did not use (a sweep's folder stays)
        run_folder.abandon_all(parents=False)
        return result
    run_folder.abandon_all()
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
                fail(exc if isinstance(exc, EENetError) else EENetError(hydra_error_line(exc)))

        return report(step)

    run_and_report._eenet = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report


def _quote_non_ascii(argv: list[str]) -> list[str]:
    """``key=value`` with non-ASCII characters in the value, quoted for Hydra.

    Hydra's override grammar reads letters outside ASCII only inside quotes, so
    ``run=/tmp/données/run`` would be refused; it is passed on as
    ``run='/tmp/données/run'`` (the same string). Only a value that Hydra refuses as
    it is and reads once quoted is changed, and never one with characters the grammar
    gives a meaning (``,`` of a sweep, brackets, quotes, ``${``): such a value is
    refused in one line that says how to quote it.
    """
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:
        return argv
    parser = None
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or value.isascii():
            out.append(arg)
            continue
        parser = parser or OverridesParser.create()
        try:
            parser.parse_overrides([arg])
            out.append(arg)
            continue
        except Exception:
            pass
        quoted = f"{key}='{value}'"
        plain = not any(c in value for c in ",[]{}()\\'\"") and "${" not in value
        try:
            if not plain:
                raise ValueError
            parser.parse_overrides([quoted])
        except Exception:
            raise EENetError(f"{arg}: Hydra reads characters outside ASCII only inside quotes; "
                             f"quote the value (in the shell too): \"{key}='{value}'\"") from None
        out.append(quoted)
    return out


def prepare_command_line() -> None:
    """Before Hydra starts: check ``sys.argv`` (and quote its non-ASCII values for Hydra),
    make Hydra's errors one line, quiet warnings that are not the user's business."""
    # fvcore's import scripts its focal loss, which torch reports as deprecated
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    try:
        sys.argv[1:] = _quote_non_ascii(sys.argv[1:])
        check_command_line(sys.argv[1:])
    except EENetError as exc:
        fail(exc)
    _one_line_hydra_errors()
