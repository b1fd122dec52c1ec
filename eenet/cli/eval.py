"""``eenet-eval``: calibrate thresholds on val, evaluate with real early exit on test
(Hydra composes the config; :mod:`eenet.jobs.evaluate` does the work).

Usage::

    eenet-eval run=RUN_DIR tolerance=0.5
    eenet-eval run=RUN_DIR budget=0.4 policy=max_prob latency=true

The output folder (``RUN_DIR/eval/<time>`` unless ``hydra.run.dir`` says otherwise)
is made with its ``INCOMPLETE`` marker before the job starts and removed again when
the job refuses the run folder (:mod:`eenet.run_folder`), so a refused run folder is
left exactly as it was.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenet.cli.common import prepare_command_line, run_job
from eenet.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _main(cfg: DictConfig) -> None:
    from eenet.jobs.evaluate import evaluate, report  # here: command-line mistakes fail first

    results = run_job(evaluate, cfg)
    print(report(results))
    written = ", ".join(["results.json", "results.md", "curve.png", "exits.png", "reliability.png",
                         *(["latency.json"] if "latency" in results else [])])
    print(f"\nWritten to {cfg.output_dir}: {written}")


def main() -> None:
    """Console entry point ``eenet-eval``."""
    prepare_command_line()
    _main()


if __name__ == "__main__":
    main()
