"""``eenet-eval``: calibrate thresholds on val, evaluate with real early exit on test
(Hydra composes the config; :mod:`eenet.jobs.evaluate` does the work).

Usage::

    eenet-eval run=RUN_DIR tolerance=0.5
    eenet-eval run=RUN_DIR budget=0.4 policy=max_prob latency=true
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from eenet.cli.common import prepare_command_line, run_job
from eenet.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _main(cfg: DictConfig) -> None:
    from eenet.jobs.evaluate import evaluate, report  # here: command-line mistakes fail first

    results = run_job(evaluate, cfg)
    print(report(results))
    print(f"\nWritten to {cfg.output_dir}: results.json, results.md, curve.png, exits.png")


def _check_run(run: str) -> None:
    from eenet.io import safe_torch_load
    from eenet.runs import check_run_folder

    check_run_folder(run)  # config.yaml: plain data, allowed classes only
    safe_torch_load(Path(run) / "model.pt", what="weights")  # tensors only


def _check_run_argument(argv: list[str]) -> None:
    """Check the folder of ``run=DIR`` (its config and weights) before Hydra creates
    ``DIR/eval/<time>`` in it, so a folder that is refused is left exactly as it was."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "run" and value and "${" not in value and "," not in value:
            quoted = len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]
            run = value[1:-1] if quoted else value
            run_job(lambda _: _check_run(run), None)


def main() -> None:
    """Console entry point ``eenet-eval``."""
    prepare_command_line()
    _check_run_argument(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
