"""WebDataset tar shards: writing (bounded in samples and bytes, write-then-rename, sha256 while
writing; plain ustar members with fixed owner, mode and mtime, so the bytes are reproducible) and
reading (member names checked: no ``..``, no absolute paths, plain files only; ``.npy``
loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

from .errors import REBUILD, DataPrepError, UnsafeTarError, one_line, os_problem

logger = logging.getLogger(__name__)

MEMBER_SUFFIX = ".input_ids.npy"
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to a multiple of this
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def shard_name(split: str, index: int, part_tag: str = "") -> str:
    """``train-000000.tar``, or ``train-00003-000000.tar`` for part 3 of a multi-part build."""
    return f"{split}-{part_tag}{index:06d}.tar"


def npy_header(seq_len: int, dtype: np.dtype) -> bytes:
    """The exact ``np.save`` header of a 1-D ``(seq_len,)`` array of ``dtype`` (format 1.0)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(seq_len, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -seq_len * dtype.itemsize]


def tar_size(n: int, member_bytes: int) -> int:
    """Size of a tar holding ``n`` members of ``member_bytes`` payload each, as tarfile writes it."""
    per = _BLOCK + -(-member_bytes // _BLOCK) * _BLOCK
    raw = n * per + 2 * _BLOCK
    return -(-raw // _RECORD) * _RECORD


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file: mode 0444, uid/gid 0, owner "sift", mtime 0.

    Written by hand because ``tarfile`` spends ~0.1 ms per member building the same header
    (40% of data prep's single-core time); ``tests`` check it equals ``tarfile``'s bytes."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    h = bytearray(_BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[265:269] = b"sift"
    h[297:301] = b"sift"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class ShardWriter:
    """Writes one split's rows into shards; each shard appears under its final name only when
    complete (written as ``<name>.tmp``, fsynced, renamed). ``on_shard`` gets each shard's record."""

    def __init__(self, out_dir: str, split: str, *, seq_len: int, dtype: np.dtype,
                 samples_per_shard: int, max_shard_bytes: int, part_tag: str = "",
                 on_shard: Callable[[dict], None] | None = None) -> None:
        self.out_dir = out_dir
        self.split = split
        self.seq_len = seq_len
        self.dtype = dtype
        self.part_tag = part_tag
        self.header = npy_header(seq_len, dtype)
        self.member_bytes = len(self.header) + seq_len * dtype.itemsize
        self.samples_per_shard = samples_per_shard
        if samples_per_shard < 1:
            raise DataPrepError("fewer than one sample per shard", where=f"--samples-per-shard {samples_per_shard}",
                                fix="pass --samples-per-shard 1 or more")
        one = tar_size(1, self.member_bytes)
        if one > max_shard_bytes:
            raise DataPrepError(f"smaller than a shard of one sample ({one} bytes)",
                                where=f"--max-shard-bytes {max_shard_bytes}",
                                fix=f"pass --max-shard-bytes {one} or more")
        self.max_shard_bytes = max_shard_bytes
        self.on_shard = on_shard
        self.records: list[dict] = []
        self._index = 0
        self._n = 0
        self._file: Any = None
        self._sha: Any = None
        self._bytes = 0
        self._name = ""
        self._pad = b"\0" * (-self.member_bytes % _BLOCK)

    def _full(self) -> bool:
        return (self._n >= self.samples_per_shard
                or tar_size(self._n + 1, self.member_bytes) > self.max_shard_bytes)

    def _tmp(self) -> str:
        return os.path.join(self.out_dir, self._name + ".tmp")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """An OSError (a full disk, a lost mount) becomes an error naming the shard file."""
        try:
            yield
        except OSError as e:
            raise os_problem(e, "cannot write a shard", self._tmp()) from e

    def _open(self) -> None:
        self._name = shard_name(self.split, self._index, self.part_tag)
        self._file = open(self._tmp(), "wb")
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._n = 0

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._bytes += len(data)

    def write(self, rows: np.ndarray) -> None:
        """Write rows of shape ``(n, seq_len)``; one sample per row."""
        with self._writing():
            self._write(rows)

    def _write(self, rows: np.ndarray) -> None:
        rows = rows.astype(self.dtype, copy=False)
        for row in rows:
            if self._file is None:
                self._open()
            key = f"{self._name[:-4]}-{self._n:06d}"
            self._put(ustar_header(key + MEMBER_SUFFIX, self.member_bytes) + self.header
                      + row.tobytes() + self._pad)
            self._n += 1
            if self._full():
                self._close_shard()

    def _close_shard(self) -> None:
        end = 2 * _BLOCK
        end += -(self._bytes + end) % _RECORD
        self._put(b"\0" * end)
        assert self._bytes == tar_size(self._n, self.member_bytes)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        rec = {"name": self._name, "split": self.split, "samples": self._n,
               "tokens": self._n * self.seq_len, "bytes": self._bytes,
               "sha256": self._sha.hexdigest()}
        self.records.append(rec)
        if self.on_shard:  # before the rename: a Ctrl-C between the two leaves no untracked shard
            self.on_shard(rec)
        os.replace(self._tmp(), os.path.join(self.out_dir, self._name))
        self._file = self._sha = None
        self._index += 1

    def close(self) -> list[dict]:
        """Finish the last (partial) shard; returns all shard records of this split."""
        if self._file is not None:
            with self._writing():
                self._close_shard()
        return self.records

    def abort(self) -> None:
        """Drop a shard in progress (its ``.tmp`` file) after an error or Ctrl-C; also one whose
        ``open`` was interrupted before ``_file`` was set (seen with Ctrl-C)."""
        if self._file is not None:
            self._file.close()
        self._file = self._sha = None
        if self._name:
            try:
                os.remove(self._tmp())
            except FileNotFoundError:
                pass


def check_member_name(name: str, path: str = "a tar file") -> None:
    """Refuse a tar member name that is absolute or climbs out with ``..`` (or is otherwise odd);
    ``path`` (the tar file) is for the message."""
    parts = name.replace("\\", "/").split("/")
    if (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts
            or "\0" in name):
        raise UnsafeTarError(f"unsafe tar member name {name!r} (absolute or with '..')", where=path,
                             fix=REBUILD)


def iter_tar_samples(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, input_ids)`` of every sample in a shard, checking every member before reading it."""
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise DataPrepError(f"not a readable tar file: {one_line(e)}", where=path, fix=REBUILD) from e
    with tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError) as e:
                raise DataPrepError(f"corrupt tar: {one_line(e)}", where=path, fix=REBUILD) from e
            if m is None:
                return
            check_member_name(m.name, path)
            if not m.isreg():
                raise UnsafeTarError(f"member {m.name!r} is not a regular file (links, devices and "
                                     "directories are refused)", where=path, fix=REBUILD)
            if not m.name.endswith(MEMBER_SUFFIX) or not _KEY_RE.match(m.name[: -len(MEMBER_SUFFIX)]):
                raise DataPrepError(f"unexpected member {m.name!r} (expected <key>{MEMBER_SUFFIX})",
                                    where=path, fix=REBUILD)
            f = tf.extractfile(m)
            assert f is not None
            try:
                arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
            except (ValueError, OSError, EOFError, tarfile.TarError) as e:
                raise DataPrepError(f"member {m.name!r} is not a valid .npy array: {one_line(e)}",
                                    where=path, fix=REBUILD) from e
            yield m.name[: -len(MEMBER_SUFFIX)], arr


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
