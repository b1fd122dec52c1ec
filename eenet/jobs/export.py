"""The export job: a finished run and its calibrated policy as ONNX segments.

``export_run(cfg)`` is what the command ``eenet-export`` (:mod:`eenet.cli.export`)
runs; the ONNX format is described in :mod:`eenet.export.onnx`. The run folder
is loaded as data (:func:`eenet.runs.load_run`: no code from it runs) and so is
``eval=RESULTS_JSON`` (JSON: only its policy name, thresholds and run path are
read; its temperatures, with ``eenet-eval temperature=true``, go into the manifest), or
``policy=`` / ``thresholds=`` (and ``temperatures=``, one per exit) given by hand.
The export goes to ``out=DIR``, or to ``RUN/onnx`` unless that is a
symlink placed in the run folder. The folder must be new or empty (``overwrite=true``
replaces an earlier export's files); it is claimed through :mod:`eenet.run_folder`:
an ``INCOMPLETE`` marker (and lock) first, ``manifest.json`` after every piece, the
marker removed last. An incomplete export (killed) is replaced by a rerun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from eenet.config_checks import check_export_config
from eenet.errors import EENetError
from eenet.export.onnx import export_segments
from eenet.policies import ExitPolicy, create_policy
from eenet.reporting.results import read_policy
from eenet.run_folder import claim_output_folder
from eenet.runs import load_run

#: What eenet-export writes into its folder (removed first when the folder is replaced).
OUTPUTS = ("manifest.json", "onnx_runner.py", "segment_*.onnx", "exit_*.onnx", "final.onnx")


def _policy_from(cfg: DictConfig) -> ExitPolicy:
    """The policy from ``eval=RESULTS_JSON`` or from ``policy=`` / ``thresholds=``."""
    if cfg.get("eval"):
        given = [k for k in ("policy", "thresholds", "temperatures") if cfg.get(k) is not None]
        if given:
            raise EENetError(f"give either eval=RESULTS_JSON or {'=/'.join(given)}=, not both "
                             f"(the evaluation's results.json carries its policy, thresholds and "
                             f"temperatures)")
        path = Path(cfg.eval)
        if not path.is_file():
            raise EENetError(f"eval results {path} not found: give the results.json of eenet-eval")
        try:
            results = json.loads(path.read_text())
        except ValueError:
            raise EENetError(f"{path} is not an eenet-eval results.json (not JSON)") from None
        # refuses a newer format, old entropy thresholds and a file without a policy
        name, thresholds, temperatures = read_policy(results, str(path))
        run = results.get("run")
        if run and Path(run).resolve() != Path(cfg.run).resolve():
            print(f"warning: {path} was calibrated for the run {run}, not {cfg.run}",
                  file=sys.stderr)
    elif cfg.get("thresholds") is None:
        raise EENetError("give the thresholds: eval=RESULTS_JSON (from eenet-eval) or "
                         "thresholds=T, or one per early exit: thresholds=[t0,t1]")
    else:
        name = cfg.get("policy") or "confidence"
        thresholds, temperatures = cfg.thresholds, cfg.get("temperatures")
        if OmegaConf.is_config(thresholds):
            thresholds = OmegaConf.to_container(thresholds)
        if OmegaConf.is_config(temperatures):
            temperatures = OmegaConf.to_container(temperatures)
    try:
        return create_policy(name, thresholds, temperatures)
    except EENetError:
        raise
    except (TypeError, ValueError):
        raise EENetError(f"thresholds must be numbers (or inf / -inf), "
                         f"got {thresholds!r}") from None


def _default_out(run: Path) -> Path:
    """``RUN/onnx``, unless the run folder (which may come from someone else) makes it a
    symlink: the export would then write wherever it points."""
    out = run / "onnx"
    if out.is_symlink():
        raise EENetError(f"{out} is a symlink (to {out.resolve()}); give the output folder "
                         f"yourself: out=DIR")
    return out


def export_run(cfg: DictConfig) -> Path:
    """Load the run, take the policy and write the export; returns the manifest's path."""
    check_export_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    policy = _policy_from(cfg)
    out = Path(cfg.out) if cfg.get("out") else _default_out(Path(cfg.run))
    if out.exists() and not out.is_dir():  # before the run is loaded: a mistake fails at once
        raise EENetError(f"out={out} is a file, not a folder; give a folder: out=DIR")
    _, dm, net, cost = load_run(cfg.run, cfg.get("data_root"))
    with claim_output_folder(out, "eenet-export", OUTPUTS, key="out",
                             overwrite=bool(cfg.get("overwrite"))) as folder:
        folder.clear(OUTPUTS)
        # export_segments writes manifest.json after every other file
        return export_segments(net, tuple(dm.input_size), out, policy, cost,
                               opset=int(cfg.opset), mean=getattr(dm, "mean", None),
                               std=getattr(dm, "std", None), check=bool(cfg.check),
                               input_range=getattr(dm, "value_range", None))
