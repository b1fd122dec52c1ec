"""Experiment loggers: Weights & Biases that never hangs on a missing network, and CSV.

``WandbLogger`` raises when no API key is configured and no mode is set, and
with a key but no network it waits for about 100 s before failing. eenet picks
the mode itself: online only when a key is configured (``WANDB_API_KEY`` or a
``api.wandb.ai`` entry in ``~/.netrc``, where ``wandb login`` puts it),
offline otherwise, and always the user's ``WANDB_MODE`` when that is set.
An offline run is uploaded later with ``wandb sync <run folder>``.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def wandb_key_configured() -> bool:
    """Whether a W&B API key is available without asking the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(offline: bool | None = None) -> str:
    """``online``, ``offline`` or ``disabled``: WANDB_MODE if set, else by key and ``offline``."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if offline is None:
        offline = not wandb_key_configured()
    return "offline" if offline else "online"


def wandb_logger(project: str = "eenet", save_dir: str = ".", offline: bool | None = None,
                 **kwargs):
    """A Lightning ``WandbLogger`` whose mode is chosen as described in the module docstring.

    Args:
        project: W&B project.
        save_dir: folder for the run files (``<save_dir>/wandb/...``).
        offline: force offline (``True``) or online (``False``); ``None`` decides by key.
        **kwargs: passed to ``WandbLogger`` (``name``, ``group``, ``tags``, ...).
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(offline)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=str(save_dir), offline=(mode == "offline"),
                       mode=mode, **kwargs)


EXIT_TABLE_COLUMNS = ["exit", "stage", "macs", "cost_fraction", "val_accuracy", "test_accuracy",
                      "test_exit_rate"]


def exit_table_rows(results: dict) -> list[list]:
    """One row per exit of a results dict, in :data:`EXIT_TABLE_COLUMNS` order."""
    return [[e["name"], e["stage"], e["macs"], e["cost_fraction"], e["val_accuracy"],
             e["test_accuracy"], r] for e, r in zip(results["exits"], results["test"]["exit_rates"])]


def is_wandb_logger(logger) -> bool:
    """Lightning's ``WandbLogger`` (the only logger eenet uses with ``log_table``)."""
    return hasattr(logger, "log_table")


def finish_wandb_run(logger) -> None:
    """Close a training job's W&B run so its files are complete when the job returns.

    Without it the run stays the process's ``wandb.run``: the offline log is only written
    when the process exits, and the next job of a sweep in the same process would log into it.
    """
    if not is_wandb_logger(logger) or getattr(logger, "_experiment", None) is None:
        return  # not W&B, or no run was ever started (nothing to close)
    logger.experiment.finish()


def log_training_results(logger, results: dict) -> None:
    """Per-exit table, accuracy-versus-cost curve and exit histogram of a training run to W&B."""
    if not is_wandb_logger(logger):
        return
    import wandb

    run = logger.experiment
    if "anytime" in results:
        curve = wandb.Table(columns=["avg_cost_fraction", "test_accuracy"],
                            data=[[p["avg_cost"], p["accuracy"]]
                                  for p in results["anytime"]["test_curve"]])
        run.log({"results/accuracy_vs_cost": wandb.plot.line(
            curve, "avg_cost_fraction", "test_accuracy", title="accuracy vs average cost (test)"),
            "results/anytime_auc": results["anytime"]["auc"]})
    hist = wandb.Table(columns=["exit", "test_exit_rate"],
                       data=[[e["name"], r] for e, r in zip(results["exits"],
                                                            results["test"]["exit_rates"])])
    run.log({"results/exit_histogram": wandb.plot.bar(hist, "exit", "test_exit_rate",
                                                      title="exit distribution (test)")})
    logger.log_table(key="results/exits", columns=EXIT_TABLE_COLUMNS, data=exit_table_rows(results))
    logger.log_metrics({f"results/test_{k}": v for k, v in results["test"].items()
                        if isinstance(v, float)})


def log_evaluation_results(settings: dict, results: dict, out_dir: Path) -> None:
    """Plots, the per-exit table and the summary of an evaluation to a W&B run.

    Args:
        settings: the evaluation's settings (``project``, ``offline``, ``group``, ``config``).
        results: the evaluation's results dict.
        out_dir: the evaluation folder (``curve.png``, ``exits.png`` and
            ``reliability.png`` are read from it).
    """
    import wandb

    run = wandb.init(project=settings.get("project", "eenet"), dir=str(out_dir),
                     mode=wandb_mode(settings.get("offline")), job_type="eval",
                     group=settings.get("group"), config=settings.get("config"))
    run.log({"eval/exits": wandb.Table(columns=EXIT_TABLE_COLUMNS, data=exit_table_rows(results)),
             "eval/curve": wandb.Image(str(out_dir / "curve.png")),
             "eval/exit_distribution": wandb.Image(str(out_dir / "exits.png")),
             "eval/reliability": wandb.Image(str(out_dir / "reliability.png")),
             "eval/test_accuracy": results["test"]["accuracy"],
             "eval/test_avg_cost": results["test"]["avg_cost_fraction"]})
    run.finish()
