"""The errors a user can fix, and how the command line shows them.

Every bad input (config, data, output directory, environment) raises an `InputError` that knows
what is wrong, where (a config key or a file), and what to do; the CLI prints it as one line,
`error: <what> (<where>): <what to do>`, and exits 2. A run stopped by a guard exits 3; exit 1
means a bug (with its traceback).
"""
from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_GUARD = 3


class InputError(ValueError):
    """Bad input: `what` is wrong at `where` (a config key or a file); `fix` says what to do."""

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.what, self.where, self.fix = what, where, fix
        super().__init__(str(self))

    def __str__(self) -> str:  # from the fields: webdataset appends its stream to an exception's args
        return f"{self.what} ({self.where}): {self.fix}" if self.where else self.what


class ConfigError(InputError):
    """A bad configuration key or value, or a file the config names."""


class DataError(InputError):
    """The shard directory is missing, incomplete, damaged or does not match the model."""


class NonFiniteStop(FloatingPointError):
    """A guard stopped the run (exit 3): non-finite losses in a row, or non-finite weights before a
    checkpoint (pipeline/guards.py). The newest complete checkpoint is intact."""


def set_key(key: str, example: str | None = None) -> str:
    """The usual fix for a bad config value."""
    return f"set {key} in the config file or with --set {key}=" + (example or "<value>")
