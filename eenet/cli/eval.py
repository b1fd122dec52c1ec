"""``eenet-eval``: calibrate thresholds on val, evaluate with real early exit on test
(Hydra composes the config; :mod:`eenet.jobs.evaluate` does the work).

Usage::

    eenet-eval run=RUN_DIR tolerance=0.5
    eenet-eval run=RUN_DIR budget=0.4 policy=max_prob latency=true
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenet.cli.common import prepare_command_line, run_job
from eenet.config import CONFIG_PATH
from eenet.jobs.evaluate import evaluate, report


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _main(cfg: DictConfig) -> None:
    results = run_job(evaluate, cfg)
    print(report(results))
    print(f"\nWritten to {cfg.output_dir}: results.json, results.md, curve.png, exits.png")


def main() -> None:
    """Console entry point ``eenet-eval``."""
    prepare_command_line()
    _main()


if __name__ == "__main__":
    main()
