"""``eenet-export``: a run and its calibrated policy as ONNX segments
(Hydra composes the config; :mod:`eenet.jobs.export` does the work).

Usage::

    eenet-export run=RUN_DIR eval=RUN_DIR/eval/<time>/results.json out=DIR
    eenet-export run=RUN_DIR policy=max_prob thresholds=[0.9,0.8] out=DIR
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from eenet.cli.common import prepare_command_line, run_job
from eenet.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def _main(cfg: DictConfig) -> None:
    from eenet.jobs.export import export_run  # here: command-line mistakes fail before torch loads

    path = run_job(export_run, cfg)
    m = json.loads(path.read_text())
    files = [f for p in m["pieces"] for f in (p["segment"], p["head"])]
    print(f"Exported {m['num_exits']} exits ({m['num_exits'] - 1} early) to {path.parent}: "
          f"{', '.join(files)}, {path.name}, {m['runner']}")
    print(f"Policy {m['policy']['name']}, thresholds {m['policy']['thresholds']}; "
          f"cost fractions {[round(e['cost_fraction'], 4) for e in m['cost']['exits']]}")


def main() -> None:
    """Console entry point ``eenet-export``."""
    prepare_command_line()
    _main()


if __name__ == "__main__":
    main()
