"""``eenet-train``: train an early-exit network (Hydra composes the config; :mod:`eenet.jobs.train`).

Usage::

    eenet-train                                   # resnet20 + 2 exits on the bundled digits
    eenet-train dataset=mnist trainer.max_epochs=5 loss.lambda_coef=0.5
    eenet-train -m loss.lambda_coef=0.5,1,2       # a sweep, one folder per job
    eenet-train --config-dir my_conf backbone=my_net   # config groups of your own

When stdout is not a terminal (a log file, a pipe), the progress bar is off unless the
command line sets ``trainer.enable_progress_bar`` itself; Lightning's advertising tip is
never printed (:mod:`eenet.jobs.train`).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, open_dict

from eenet.cli.common import prepare_command_line, run_job
from eenet.config import CONFIG_PATH


def progress_bar_off(overrides: list[str], tty: bool) -> bool:
    """True when the progress bar is to be switched off: stdout is not a terminal and no
    command-line override (``overrides``, Hydra's list) sets ``trainer.enable_progress_bar``."""
    asked = any(o.split("=", 1)[0].lstrip("+~") == "trainer.enable_progress_bar"
                for o in overrides)
    return not (tty or asked)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    # the training stack is imported here, not at the top: a mistake on the command line
    # is reported before Lightning and torch are loaded
    from eenet.jobs.train import objective, process_rank, train

    if progress_bar_off(list(HydraConfig.get().overrides.task), sys.stdout.isatty()):
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = False  # a redirected log gets no bar
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
