"""Errors raised by data prep. Every message names what to fix (file, line, flag)."""

from __future__ import annotations


class DataPrepError(ValueError):
    """A problem with the inputs, flags or output directory, found before or during a build."""


class BadInputError(DataPrepError):
    """A bad document or file. ``path`` and ``line`` (1-based, None for whole-file errors) say where."""

    def __init__(self, path: str, line: int | None, reason: str, hint: str = "") -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        msg = f"{where}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class UnsafeTarError(DataPrepError):
    """A tar member whose name or type could escape the directory or is not a plain shard file."""
