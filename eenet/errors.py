"""The one exception type for a user's mistake (bad name, bad number, missing file).

Entry points print its message as a single line and exit with a non-zero code;
the full traceback is shown only with ``HYDRA_FULL_ERROR=1``.
"""


class EENetError(ValueError):
    """A configuration or input error, with a message that says what is accepted."""


def unknown_name(kind: str, name: str, accepted) -> EENetError:
    """Error for an unknown registry name, listing what is accepted."""
    return EENetError(f"unknown {kind} '{name}'; accepted: {', '.join(sorted(accepted))}")
