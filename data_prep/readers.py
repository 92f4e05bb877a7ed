"""Input discovery and document readers: plain text, JSON Lines, CSV, Parquet, ``save_to_disk`` dirs.

Every reader yields :class:`Doc` records carrying a 1-based line (or row) number, so a bad document
can be reported as ``file:line``. A bad document is yielded with ``error`` set rather than raised,
so the caller decides between failing (the default) and skipping with a count (``--skip-bad``).
Errors that stop a whole file (cannot open, truncated gzip, no such column) raise
:class:`BadInputError`. A line with NUL bytes is reported as binary data (``binary``), not as bad UTF-8.
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

from .errors import BadInputError, DataPrepError, one_line

logger = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "csv", "parquet", "hf_dataset")
DOC_SEPARATORS = ("line", "blank")

# Reasons a document is skipped. "empty" and "no_tokens" are skipped always (nothing to train on);
# the others are bad input: an error unless skip_bad is set.
BAD_REASONS = ("binary", "undecodable", "invalid_json", "not_an_object", "missing_field", "not_a_string")
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


SKIP_BAD = "or pass --skip-bad to skip and count such documents"
EMPTY_FIX = "check that the inputs hold text (are --format, --text-field and --text-column right?)"
_NOT_UTF8 = "bytes are not valid UTF-8"
_REENCODE = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
_BINARY = "binary data (NUL bytes), not text"
_TEXT_ONLY = "give text files only (a compressed one needs its .gz name, other formats --format)"
_SKIP_FILE = "or pass --skip-bad to skip it"
_SKIP_REST = "or pass --skip-bad to keep what was read before it"


@dataclass(frozen=True)
class Doc:
    """A document (``text``), or a bad one: ``error`` a reason code, ``detail`` what, ``fix`` what to do."""

    line: int
    text: str | None
    error: str | None = None
    detail: str = ""
    fix: str = ""


def check_doc_separator(doc_separator: str) -> None:
    """Refuse an unknown --doc-separator before anything is read."""
    if doc_separator not in DOC_SEPARATORS:
        raise DataPrepError(f"unknown document separator {doc_separator!r}", where="--doc-separator",
                            fix=f"use one of {', '.join(DOC_SEPARATORS)}")


def _is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(
        os.path.join(path, "dataset_info.json"))


def _detect_format(path: str) -> str:
    if os.path.isdir(path):
        if _is_dataset_dir(path):
            return "hf_dataset"
        raise BadInputError(path, None, "a directory, not a datasets.save_to_disk directory (no "
                            "state.json and dataset_info.json)",
                            fix=f"pass the files in it, e.g. --input '{os.path.join(path, '*.jsonl')}'")
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext not in _EXT_FORMATS:
        raise BadInputError(path, None, f"cannot tell the format from the extension {ext or '(none)'!r}",
                            fix=f"pass --format ({', '.join(FORMATS)}) or name the file with one of "
                                f"{', '.join(sorted(_EXT_FORMATS))} (optionally + .gz)")
    return _EXT_FORMATS[ext]


def _expand_one(spec: str) -> list[str]:
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec, recursive=True))
        if not found:
            raise DataPrepError("no files match this glob", where=f"--input {spec}",
                                fix="check the pattern and the directory it is relative to")
        return found
    if not os.path.exists(spec):
        raise BadInputError(spec, None, "no such file or directory",
                            fix="check the path given to --input")
    dict_file = os.path.join(spec, "dataset_dict.json")
    if os.path.isdir(spec) and os.path.isfile(dict_file):
        return [os.path.join(spec, s) for s in _dataset_dict_splits(dict_file)]
    return [spec]


def _dataset_dict_splits(dict_file: str) -> list[str]:
    """The split names of a DatasetDict (each split is its own save_to_disk directory)."""
    try:
        with open(dict_file, encoding="utf-8") as f:
            splits = [os.fspath(s) for s in json.load(f)["splits"]]
    except (OSError, ValueError, LookupError, TypeError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise BadInputError(dict_file, None, f"not a readable DatasetDict index: {one_line(e)}",
                            fix="save the dataset again with DatasetDict.save_to_disk, or pass "
                                "its split directories to --input") from e
    return sorted(splits)


def expand_inputs(inputs: list[str], fmt: str | None = None) -> list[Source]:
    """Expand paths and globs into a sorted, de-duplicated list of sources.

    Sorting makes the output independent of the order of ``--input`` arguments.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataPrepError("no inputs given", where="--input",
                            fix="pass files, globs or datasets.save_to_disk directories")
    if fmt is not None and fmt not in FORMATS:
        raise _unknown_format(fmt)
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


def _unknown_format(fmt: str) -> DataPrepError:
    return DataPrepError(f"unknown input format {fmt!r}", where="--format",
                        fix=f"use one of {', '.join(FORMATS)}")


def _open_binary(path: str) -> IO[bytes]:
    if os.path.isdir(path):
        raise BadInputError(path, None, "a directory, not a file",
                            fix=f"pass the files in it, e.g. --input '{os.path.join(path, '*')}'")
    gz = path.endswith(".gz")
    try:
        f: IO[bytes] = gzip.open(path, "rb") if gz else open(path, "rb")  # type: ignore[assignment]
    except OSError as e:
        raise BadInputError(path, None, f"cannot open: {e.strerror or one_line(e)}",
                            fix=f"check the path and its permissions, {_SKIP_FILE}") from e
    if gz:
        try:
            f.peek(1)  # type: ignore[attr-defined]  # fail now on a file that is not gzip
        except (OSError, EOFError, zlib.error) as e:
            f.close()
            raise BadInputError(path, None, f"not gzip data despite the .gz name: {one_line(e)}",
                                fix=f"name it without .gz if it is not compressed, {_SKIP_FILE}") from e
    return f


def _read_error(path: str, line: int, e: BaseException) -> BadInputError:
    """A file that stops being readable part way (truncated gzip, I/O error)."""
    return BadInputError(path, line, f"read error, truncated or corrupt file: {one_line(e)}",
                         fix=f"copy or download the file again, {_SKIP_REST}")


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Numbered raw lines; a file starting with a UTF-16/32 byte-order mark is refused whole."""
    f = _open_binary(path)
    lineno = 0
    try:
        with f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # a byte-order mark
                    raise BadInputError(path, 1, "UTF-16 or UTF-32 text, not UTF-8", fix="convert it to UTF-8 "
                                        "(e.g. iconv -f UTF-16 -t UTF-8) and pass the converted file")
                yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, lineno + 1, e) from e


def _decode(lineno: int, raw: bytes) -> str | Doc:
    """The line as text, or the bad Doc saying why it is not text (binary data, not UTF-8)."""
    if b"\0" in raw:
        return Doc(lineno, None, "binary", _BINARY, _TEXT_ONLY)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return Doc(lineno, None, "undecodable", _NOT_UTF8, _REENCODE)


def read_text(path: str, doc_separator: str = "line") -> Iterator[Doc]:
    """Plain text: one document per non-blank line, or paragraphs separated by blank lines."""
    check_doc_separator(doc_separator)
    if doc_separator == "line":
        for lineno, raw in _lines(path):
            text = _decode(lineno, raw)
            if isinstance(text, Doc):
                yield text
            elif text.strip():
                yield Doc(lineno, text.rstrip("\r\n"))
        return
    start, parts, bad = 0, [], None
    for lineno, raw in _lines(path):
        text = _decode(lineno, raw)
        if isinstance(text, str) and not text.strip():
            if parts or bad:
                yield _paragraph(start, parts, bad)
            start, parts, bad = 0, [], None
            continue
        if not start:
            start = lineno
        if isinstance(text, Doc):
            bad = bad or text
        else:
            parts.append(text.rstrip("\r\n"))
    if parts or bad:
        yield _paragraph(start, parts, bad)


def _paragraph(start: int, parts: list[str], bad: Doc | None) -> Doc:
    if bad is not None:
        return Doc(bad.line, None, bad.error, f"{bad.detail} (paragraph from line {start})", bad.fix)
    return Doc(start, "\n".join(parts))


def _text_value(lineno: int, value: object, field: str) -> Doc:
    if not isinstance(value, str):
        return Doc(lineno, None, "not_a_string", f"field {field!r} is {type(value).__name__}, not a string",
                   f"make {field!r} a string in the input")
    try:
        value.encode("utf-8")  # lone surrogates: undecodable input bytes (CSV) or bad \u escapes
    except UnicodeEncodeError:
        return Doc(lineno, None, "undecodable", _NOT_UTF8, _REENCODE)
    if not value.strip():
        return Doc(lineno, None, "empty", "empty text")
    return Doc(lineno, value)


def read_jsonl(path: str, text_field: str = "text") -> Iterator[Doc]:
    """JSON Lines (optionally gzipped): one object per line, the document in ``text_field``."""
    for lineno, raw in _lines(path):
        line = _decode(lineno, raw)
        if isinstance(line, Doc):
            yield line
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Doc(lineno, None, "invalid_json", f"invalid JSON: {e.msg.removesuffix(' at')} at column {e.colno}",
                      "fix the line (one JSON object per line)")
            continue
        if not isinstance(obj, dict):
            yield Doc(lineno, None, "not_an_object", f"a JSON {type(obj).__name__}, not an object",
                      'make each line an object such as {"text": "..."}')
        elif text_field not in obj:
            yield Doc(lineno, None, "missing_field", f"no field {text_field!r} (fields: {sorted(obj)[:10]})",
                      "pass --text-field with the field holding the text")
        else:
            yield _text_value(lineno, obj[text_field], text_field)


def read_csv(path: str, text_column: str = "text") -> Iterator[Doc]:
    """CSV with a header row; the document is in ``text_column``. Line = where the record starts."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    f = _open_binary(path)
    stream = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    start = 1
    try:
        with stream:
            reader = csv.reader(stream)
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise BadInputError(path, 1, f"invalid CSV header: {e}",
                                    fix=f"fix the header row, {_SKIP_FILE}") from e
            if text_column not in header:
                raise _no_column(path, 1, text_column, header)
            col = header.index(text_column)
            start = reader.line_num + 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise BadInputError(path, start, f"invalid CSV: {e}",
                                        fix=f"fix the record (an unclosed quote?), {_SKIP_REST}") from e
                if row:
                    if col >= len(row):
                        yield Doc(start, None, "missing_field", f"row has no column {text_column!r}",
                                  "fix the row (too few fields)")
                    elif "\0" in row[col]:  # CSV has no escapes: a NUL here was a NUL byte
                        yield Doc(start, None, "binary", _BINARY, _TEXT_ONLY)
                    else:
                        yield _text_value(start, row[col], text_column)
                start = reader.line_num + 1
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, start, e) from e


def read_parquet(path: str, text_column: str = "text") -> Iterator[Doc]:
    """Parquet, streamed in record batches with pyarrow; line = 1-based row number."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise BadInputError(path, None, f"cannot read as Parquet: {one_line(e)}",
                            fix=f"check that it is a Parquet file (else pass --format), {_SKIP_FILE}") from e
    names = pf.schema_arrow.names
    if text_column not in names:
        raise _no_column(path, None, text_column, names)
    row = 0
    try:
        for batch in pf.iter_batches(columns=[text_column], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                yield _text_value(row, value, text_column)
    except Exception as e:  # a corrupt page or row group: pyarrow's own exception types
        raise _read_error(path, row + 1, e) from e


def read_hf_dataset(path: str, text_column: str = "text") -> Iterator[Doc]:
    """A directory written by ``datasets.Dataset.save_to_disk``; line = 1-based row number."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise BadInputError(path, None, f"cannot load with datasets.load_from_disk: {one_line(e)}",
                            fix="pass a directory written by save_to_disk (else set --format), "
                                + _SKIP_FILE) from e
    if text_column not in ds.column_names:
        raise _no_column(path, None, text_column, ds.column_names)
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
    raise _unknown_format(source.fmt)


def _no_column(path: str, line: int | None, column: str, columns: list[str]) -> BadInputError:
    return BadInputError(path, line, f"no column {column!r} (columns: {list(columns)[:20]})",
                         fix="pass --text-column with the column holding the text")
