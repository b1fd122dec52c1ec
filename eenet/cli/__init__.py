"""The command-line entry points ``eenet-train``, ``eenet-eval`` and ``eenet-export``.

Each is thin: Hydra composes the config (the only place with ``@hydra.main``),
the library's job (:mod:`eenet.jobs`) does the work, the entry point prints.
Nothing in the library imports this package.
"""
