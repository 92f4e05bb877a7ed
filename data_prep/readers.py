"""Input discovery and document readers: plain text, JSON Lines, CSV, Parquet, ``save_to_disk`` dirs.

Every reader yields :class:`Doc` records carrying a 1-based line (or row) number, so a bad document
can be reported as ``file:line``. A bad document is yielded with ``error`` set rather than raised,
so the caller decides between failing (the default) and skipping with a count (``--skip-bad``).
Errors that stop a whole file (cannot open, truncated gzip, no such column) raise
:class:`BadInputError`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import sys
import zlib
from dataclasses import dataclass
from typing import IO, Iterator

from .errors import BadInputError, DataPrepError

logger = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "csv", "parquet", "hf_dataset")
DOC_SEPARATORS = ("line", "blank")

# Reasons a document is skipped. "empty" and "no_tokens" are skipped always (nothing to train on);
# the others are bad input: an error unless skip_bad is set.
BAD_REASONS = ("undecodable", "invalid_json", "not_an_object", "missing_field", "not_a_string")
EMPTY_REASONS = ("empty", "no_tokens")

_EXT_FORMATS = {
    ".txt": "text", ".text": "text",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}


@dataclass(frozen=True)
class Source:
    """One input: a file, or a ``datasets.save_to_disk`` directory."""

    path: str
    fmt: str


@dataclass(frozen=True)
class Doc:
    """A document (``text``) or a bad one (``error`` is a reason code, ``detail`` says more)."""

    line: int
    text: str | None
    error: str | None = None
    detail: str = ""


def _is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(
        os.path.join(path, "dataset_info.json"))


def _detect_format(path: str) -> str:
    if os.path.isdir(path):
        if _is_dataset_dir(path):
            return "hf_dataset"
        raise DataPrepError(f"{path}: a directory that is not a datasets.save_to_disk directory "
                            "(no state.json/dataset_info.json); pass files or a glob instead")
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext not in _EXT_FORMATS:
        raise DataPrepError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
                            f"use one of {sorted(_EXT_FORMATS)} (optionally .gz) or pass --format")
    return _EXT_FORMATS[ext]


def _expand_one(spec: str) -> list[str]:
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec, recursive=True))
        if not found:
            raise DataPrepError(f"--input {spec!r}: no files match this glob")
        return found
    if not os.path.exists(spec):
        raise BadInputError(spec, None, "no such file or directory")
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "dataset_dict.json")):
        # A DatasetDict: each split is its own save_to_disk directory.
        with open(os.path.join(spec, "dataset_dict.json"), encoding="utf-8") as f:
            splits = json.load(f).get("splits", [])
        return [os.path.join(spec, s) for s in sorted(splits)]
    return [spec]


def expand_inputs(inputs: list[str], fmt: str | None = None) -> list[Source]:
    """Expand paths and globs into a sorted, de-duplicated list of sources.

    Sorting makes the output independent of the order of ``--input`` arguments.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataPrepError("no inputs given (--input)")
    if fmt is not None and fmt not in FORMATS:
        raise DataPrepError(f"--format {fmt!r}: must be one of {FORMATS}")
    seen: dict[str, str] = {}
    for spec in inputs:
        for path in _expand_one(os.fspath(spec)):
            path = os.path.normpath(path)
            seen.setdefault(os.path.realpath(path), path)
    paths = sorted(seen.values())
    return [Source(p, fmt or _detect_format(p)) for p in paths]


def source_fingerprint(source: Source) -> tuple[str, int]:
    """sha256 and size in bytes of a source (for a dataset dir: over its files, in name order)."""
    h = hashlib.sha256()
    size = 0
    if os.path.isdir(source.path):
        files = sorted(f for f in os.listdir(source.path)
                       if os.path.isfile(os.path.join(source.path, f)))
        paths = [os.path.join(source.path, f) for f in files]
    else:
        paths = [source.path]
    for p in paths:
        if len(paths) > 1:
            h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


def _open_binary(path: str) -> IO[bytes]:
    try:
        if path.endswith(".gz"):
            f = gzip.open(path, "rb")
            f.peek(1)  # fail now on a file that is not gzip
            return f
        return open(path, "rb")
    except (OSError, EOFError, zlib.error) as e:
        raise BadInputError(path, None, f"cannot read: {e}") from e


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    f = _open_binary(path)
    lineno = 0
    try:
        with f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:
        raise BadInputError(path, lineno + 1, f"read error (truncated or corrupt file?): {e}") from e


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_text(path: str, doc_separator: str = "line") -> Iterator[Doc]:
    """Plain text: one document per non-blank line, or paragraphs separated by blank lines."""
    if doc_separator not in DOC_SEPARATORS:
        raise DataPrepError(f"--doc-separator {doc_separator!r}: must be one of {DOC_SEPARATORS}")
    if doc_separator == "line":
        for lineno, raw in _lines(path):
            text = _decode(raw)
            if text is None:
                yield Doc(lineno, None, "undecodable", "bytes are not valid UTF-8")
            elif text.strip():
                yield Doc(lineno, text.rstrip("\r\n"))
        return
    start, parts, bad = 0, [], 0
    for lineno, raw in _lines(path):
        text = _decode(raw)
        if text is not None and not text.strip():
            if parts or bad:
                yield _paragraph(start, parts, bad)
            start, parts, bad = 0, [], 0
            continue
        if not start:
            start = lineno
        if text is None:
            bad = bad or lineno
        else:
            parts.append(text.rstrip("\r\n"))
    if parts or bad:
        yield _paragraph(start, parts, bad)


def _paragraph(start: int, parts: list[str], bad: int) -> Doc:
    if bad:
        return Doc(bad, None, "undecodable", f"bytes are not valid UTF-8 (paragraph from line {start})")
    return Doc(start, "\n".join(parts))


def _text_value(lineno: int, value: object, field: str) -> Doc:
    if not isinstance(value, str):
        return Doc(lineno, None, "not_a_string", f"field {field!r} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")  # lone surrogates: undecodable input bytes (CSV) or bad \u escapes
    except UnicodeEncodeError:
        return Doc(lineno, None, "undecodable", "bytes are not valid UTF-8")
    if not value.strip():
        return Doc(lineno, None, "empty", "empty text")
    return Doc(lineno, value)


def read_jsonl(path: str, text_field: str = "text") -> Iterator[Doc]:
    """JSON Lines (optionally gzipped): one object per line, the document in ``text_field``."""
    for lineno, raw in _lines(path):
        line = _decode(raw)
        if line is None:
            yield Doc(lineno, None, "undecodable", "bytes are not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Doc(lineno, None, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield Doc(lineno, None, "not_an_object", f"a JSON {type(obj).__name__}, not an object")
        elif text_field not in obj:
            yield Doc(lineno, None, "missing_field",
                      f"no field {text_field!r} (fields: {sorted(obj)[:10]}; see --text-field)")
        else:
            yield _text_value(lineno, obj[text_field], text_field)


def read_csv(path: str, text_column: str = "text") -> Iterator[Doc]:
    """CSV with a header row; the document is in ``text_column``. Line = where the record starts."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    f = _open_binary(path)
    stream = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    try:
        with stream:
            reader = csv.reader(stream)
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise BadInputError(path, 1, f"invalid CSV header: {e}") from e
            if text_column not in header:
                raise BadInputError(path, 1, f"no column {text_column!r} in the header "
                                    f"(columns: {header[:20]}; see --text-column)")
            col = header.index(text_column)
            start = reader.line_num + 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise BadInputError(path, start, f"invalid CSV: {e}") from e
                if row:
                    if col >= len(row):
                        yield Doc(start, None, "missing_field", f"row has no column {text_column!r}")
                    else:
                        yield _text_value(start, row[col], text_column)
                start = reader.line_num + 1
    except (OSError, EOFError, zlib.error) as e:
        raise BadInputError(path, None, f"read error (truncated or corrupt file?): {e}") from e


def read_parquet(path: str, text_column: str = "text") -> Iterator[Doc]:
    """Parquet, streamed in record batches with pyarrow; line = 1-based row number."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise BadInputError(path, None, f"cannot read as Parquet: {e}") from e
    names = pf.schema_arrow.names
    if text_column not in names:
        raise BadInputError(path, None, f"no column {text_column!r} (columns: {names[:20]}; "
                            "see --text-column)")
    row = 0
    for batch in pf.iter_batches(columns=[text_column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text_value(row, value, text_column)


def read_hf_dataset(path: str, text_column: str = "text") -> Iterator[Doc]:
    """A directory written by ``datasets.Dataset.save_to_disk``; line = 1-based row number."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise BadInputError(path, None, f"cannot load with datasets.load_from_disk: {e}") from e
    if text_column not in ds.column_names:
        raise BadInputError(path, None, f"no column {text_column!r} (columns: "
                            f"{ds.column_names[:20]}; see --text-column)")
    row = 0
    for batch in ds.select_columns([text_column]).iter(batch_size=4096):
        for value in batch[text_column]:
            row += 1
            yield _text_value(row, value, text_column)


def read_documents(source: Source, *, text_field: str = "text", text_column: str = "text",
                   doc_separator: str = "line") -> Iterator[Doc]:
    """Documents of one source, in file order."""
    if source.fmt == "text":
        return read_text(source.path, doc_separator)
    if source.fmt == "jsonl":
        return read_jsonl(source.path, text_field)
    if source.fmt == "csv":
        return read_csv(source.path, text_column)
    if source.fmt == "parquet":
        return read_parquet(source.path, text_column)
    if source.fmt == "hf_dataset":
        return read_hf_dataset(source.path, text_column)
    raise DataPrepError(f"unknown format {source.fmt!r}")
