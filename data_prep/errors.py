"""Errors raised by data prep, in one form: ``<what> (<where>): <what to do>``.

Why a fixed form: the CLI prints ``error: {err}`` as its only stderr line (exit 2), so every
message must say, on one line, what went wrong, where (a file, ``file:line``, a flag such as
``--seq-len``, or a manifest key) and a concrete action (a flag to change, a command to run, a
file to fix or remove). The three parts are kept as attributes so callers and tests can use them
without parsing the text.
"""

from __future__ import annotations

import errno
import re

_DETAIL_CHARS = 300


def one_line(text: object, limit: int = _DETAIL_CHARS) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters.

    Messages embed third-party exception texts (transformers, pyarrow, pip) that span lines; the
    CLI's contract is one stderr line."""
    s = re.sub(r"\s*\n\s*", " ", str(text)).strip()
    return s if len(s) <= limit else s[: limit - 3].rstrip() + "..."


# The fix for a damaged manifest or shard (data_prep's own output): the same words wherever found.
REBUILD = "do not train on it: rebuild it with `python -m data_prep build` into a new --out"


class DataPrepError(ValueError):
    """A problem with the inputs, flags, output directory or environment; exit 2 in the CLI.

    ``what`` went wrong, ``where`` (file, ``file:line``, flag or key), ``fix``: what to do."""

    def __init__(self, what: str, *, where: str, fix: str) -> None:
        self.what = one_line(what, 10_000)
        self.where = one_line(where, 10_000)
        self.fix = one_line(fix, 10_000)
        super().__init__(f"{self.what} ({self.where}): {self.fix}")

    @property
    def problem(self) -> str:
        """``<what> (<where>)`` without the advice: for records such as a manifest's ``error``,
        where "use --skip-bad" would be advice already taken."""
        return f"{self.what} ({self.where})"

    def __reduce__(self) -> tuple:
        # Keyword-only arguments: the default pickling (cls(*args)) could not rebuild it.
        return _rebuild, (type(self), self.__dict__.copy())


def _rebuild(cls: type, state: dict) -> DataPrepError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    ValueError.__init__(err, f"{err.what} ({err.where}): {err.fix}")
    return err


class BadInputError(DataPrepError):
    """A bad document or input file. ``path`` and ``line`` (1-based, None for whole-file errors)
    say where, ``reason`` what; ``where`` is ``path:line`` (or ``path``)."""

    def __init__(self, path: str, line: int | None, reason: str, fix: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(reason, where=f"{path}:{line}" if line is not None else path, fix=fix)


class UnsafeTarError(DataPrepError):
    """A tar member whose name or type could escape the directory or is not a plain shard file."""


_OS_FIXES = {
    errno.ENOENT: "check the path (a parent directory is missing?)",
    errno.EACCES: "fix its permissions or choose another path",
    errno.EPERM: "fix its permissions or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOSPC: "free disk space or choose a path on another disk",
    errno.EDQUOT: "free disk space (quota exceeded) or choose a path on another disk",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EIO: "the file or its disk is damaged: copy the file again",
    errno.ENAMETOOLONG: "use a shorter path",
}


def os_problem(e: OSError, doing: str, path: str | None = None, fix: str = "") -> DataPrepError:
    """A DataPrepError for an OSError met while ``doing`` (e.g. "cannot write the shard"):
    the system's reason, the path, and a fix suited to the errno unless ``fix`` is given."""
    where = path or (e.filename if e.filename is not None else "?")
    reason = e.strerror or one_line(e)
    return DataPrepError(f"{doing}: {reason}", where=str(where),
                         fix=fix or _OS_FIXES.get(e.errno or 0, "check the path, its permissions and the disk"))
