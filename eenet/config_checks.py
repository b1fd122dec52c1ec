"""Checks of a composed config's options, in one place, before a job writes anything.

Each job (:mod:`eenet.jobs.train`, :mod:`eenet.jobs.evaluate`, :mod:`eenet.jobs.export`)
calls its check first. A bad option raises :class:`~eenet.errors.EENetError` with one
line naming the key, the value and what is accepted; objects built from the config
(backbones, losses, policies, data sets) still check their own arguments where they
are built, also before anything is written.
"""

from __future__ import annotations

from omegaconf import DictConfig


def check_train_config(cfg: DictConfig) -> None:
    """The options of ``eenet-train`` (``conf/train.yaml``)."""


def check_eval_config(cfg: DictConfig) -> None:
    """The options of ``eenet-eval`` (``conf/eval.yaml``)."""


def check_export_config(cfg: DictConfig) -> None:
    """The options of ``eenet-export`` (``conf/export.yaml``)."""
