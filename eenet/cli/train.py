"""``eenet-train``: train an early-exit network (Hydra composes the config; :mod:`eenet.jobs.train`).

Usage::

    eenet-train                                   # resnet20 + 2 exits on the bundled digits
    eenet-train dataset=mnist trainer.max_epochs=5 loss.lambda_coef=0.5
    eenet-train -m loss.lambda_coef=0.5,1,2       # a sweep, one folder per job
    eenet-train --config-dir my_conf backbone=my_net   # config groups of your own
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenet.cli.common import prepare_command_line, run_job
from eenet.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    # the training stack is imported here, not at the top: a mistake on the command line
    # is reported before Lightning and torch are loaded
    from eenet.jobs.train import objective, process_rank, train
    from eenet.reporting.markdown import results_markdown

    results, _ = run_job(train, cfg)
    if process_rank() == 0:
        print(results_markdown(results))
        print(f"\nResults written to {cfg.output_dir}/results.json")
    return objective(results)


def main() -> None:
    """Console entry point ``eenet-train``."""
    prepare_command_line()
    _main()


if __name__ == "__main__":
    main()
