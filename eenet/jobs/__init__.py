"""The jobs behind the commands, as plain functions of a composed config.

``train(cfg)``, ``evaluate(cfg)`` and ``export_run(cfg)`` do the work of
``eenet-train``, ``eenet-eval`` and ``eenet-export``; tests and experiment scripts
call them with :func:`eenet.config.compose_config`.
"""
