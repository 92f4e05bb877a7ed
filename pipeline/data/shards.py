"""Reading data_prep shards: the tar stream (webdataset) with an optional seeded shuffle buffer,
decoding a sample into token ids (never unpickling), the data.verify checksum, and counting what
corrupt data costs (SkipCounter). The training stream (candidates.py) and the eval set (eval.py)
read through here.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator

import numpy as np
import webdataset as wds

from pipeline.errors import DataError

log = logging.getLogger(__name__)


STRICT_FIX = "restore the shard or rebuild the shards; with data.strict=false it is skipped and counted"


class CorruptSampleError(DataError):
    """A sample or shard that cannot be decoded; `where` is the shard."""

    def __init__(self, what: str, where: str, fix: str = STRICT_FIX) -> None:
        super().__init__(what, where, fix)


class SampleMismatchError(CorruptSampleError):
    """A well-formed array that does not fit the manifest (length, dtype, ids >= vocab_size)."""


def decode_sample(sample: dict, seq_len: int, vocab_size: int) -> tuple[str, np.ndarray]:
    """Shard sample -> (key, token ids). Never unpickles; rejects unsafe names and bad arrays."""
    key, url = sample.get("__key__", ""), sample.get("__url__", "?")
    if ".." in key or key.startswith("/") or "/" in key:
        raise CorruptSampleError(f"unsafe member name {key!r} (contains '..' or a path)", url,
                                 "use shards written by data_prep only")
    payload = sample.get("input_ids.npy")
    if payload is None:
        raise CorruptSampleError(f"sample {key!r} has no input_ids.npy (members: {sorted(sample)})", url)
    try:
        ids = load_npy(payload)
    except Exception as err:  # numpy raises ValueError/OSError/EOFError on bad bytes or pickles
        raise CorruptSampleError(f"sample {key!r} is not a plain .npy array ({err})", url) from err
    if ids.ndim != 1 or ids.shape[0] != seq_len or ids.dtype.kind not in "iu":
        raise SampleMismatchError(f"sample {key!r}: expected {seq_len} integer ids, got {ids.dtype}{ids.shape}", url)
    if ids.size and int(ids.max()) >= vocab_size:
        raise SampleMismatchError(f"sample {key!r}: token id {int(ids.max())} >= vocab size {vocab_size}", url)
    return key, ids


_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, int]] = {}  # a 1-D .npy header np.load accepted -> (dtype, length)


def load_npy(payload: bytes) -> np.ndarray:
    """np.load(allow_pickle=False) of a .npy payload, faster for the headers it has seen. numpy parses
    every header with ast.literal_eval, most of the time np.load takes for 64 token ids, and data_prep
    writes one header for all samples: a 1-D header np.load accepted once gives the dtype and length
    of every payload with the same header bytes (a few kept per process)."""
    header = payload[:_npy_data_offset(payload)]
    layout = _NPY_LAYOUTS.get(header) if header else None
    if layout is None:
        ids = np.load(io.BytesIO(payload), allow_pickle=False)
        if header and ids.ndim == 1 and len(_NPY_LAYOUTS) < 16:
            _NPY_LAYOUTS[header] = (ids.dtype, ids.shape[0])
        return ids
    dtype, length = layout
    return np.frombuffer(payload, dtype, length, len(header)).copy()  # too few bytes: ValueError, as np.load


def _npy_data_offset(payload: bytes) -> int:
    """Where a .npy payload's array data starts (format versions 1-3), 0 if it is no .npy (np.load says why)."""
    if payload[:6] != b"\x93NUMPY" or len(payload) < 12:
        return 0
    if payload[6] == 1:
        return 10 + int.from_bytes(payload[8:10], "little")
    return 12 + int.from_bytes(payload[8:12], "little") if payload[6] in (2, 3) else 0


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: each file hashed once per process


def file_sha256(path: str) -> str:
    """sha256 of a local file, cached per process for as long as its size and mtime stay the same."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


class SkipCounter:
    """webdataset handler and fault counter for one stream: strict mode raises; otherwise it logs and
    counts each skipped sample once (a stream read twice, e.g. repeated to pad, counts it once)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped = 0  # samples lost: undecodable, or missing from a short shard
        self.skipped_shards = 0  # whole shards left out: their bytes are not the ones the manifest records
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, exn: Exception) -> bool:
        """Tar-level errors (webdataset calls this): the samples they cost are counted per shard."""
        where = "; ".join(str(arg) for arg in exn.args if isinstance(arg, str)) or repr(exn)
        if self.strict:
            if isinstance(exn, CorruptSampleError):  # raised here before, on its way up through webdataset
                raise exn
            found = re.search(r"[^\s'\"<>]+\.tar\b", " ".join(map(str, exn.args)))  # webdataset names it somewhere
            shard = found.group(0) if found else "a shard"
            raise CorruptSampleError(f"corrupt shard data, with data.strict=true ({exn.args[0]})", shard) from exn
        log.warning("corrupt shard data, skipped: %s", where)
        return True

    def verified(self, url: str, expected_sha256: str | None) -> bool:
        """data.verify: the shard's sha256 is the manifest's. A mismatch (a flipped byte that may even
        still decode) is refused with data.strict=true, else the shard is skipped, counted and named."""
        if not expected_sha256 or "://" in url or url.startswith("pipe:"):
            return True  # remote streams are not hashed (it would read them twice)
        actual = file_sha256(url)
        if actual == expected_sha256:
            return True
        if self.strict:
            raise CorruptSampleError(f"sha256 {actual[:12]}... is not the manifest's {expected_sha256[:12]}... "
                                     "(changed since data_prep wrote it), with data.strict=true", url)
        if (url, "<sha256>") not in self._seen:
            self._seen.add((url, "<sha256>"))
            self.skipped_shards += 1
            log.warning("skipping shard %s: its sha256 is not the manifest's (changed since data_prep wrote it; "
                        "counted in data/skipped_shards)", url)
        return False

    def bad_sample(self, err: CorruptSampleError, url: str, key: str) -> None:
        """A sample of this counter's stream that does not decode: refused in strict mode, else counted."""
        self.refuse_if_strict(err)
        self._count((url, key), 1, str(err))

    def refuse_if_strict(self, err: CorruptSampleError) -> None:
        """Strict mode stops at an undecodable sample. The training stream counts such samples itself,
        per batch (candidates.py): a worker decodes only its own batches, so it could not count them here."""
        if self.strict:
            raise type(err)(f"{err.what}, with data.strict=true", err.where, err.fix) from err

    def short_shard(self, url: str, got: int, expected: int) -> None:
        message = f"{url}: {got} readable samples, the manifest says {expected} (truncated or damaged shard)"
        if self.strict:
            raise CorruptSampleError(f"{got} readable samples, the manifest says {expected} (truncated or damaged "
                                     "shard), with data.strict=true", url)
        if got < expected:
            self._count((url, "<short>"), expected - got, message)
        else:
            log.warning("%s", message)

    def _count(self, what: tuple[str, str], samples: int, message: str) -> None:
        if what in self._seen:
            return
        self._seen.add(what)
        self.skipped += samples
        log.warning("skipping %d corrupt sample(s) (%d so far): %s", samples, self.skipped, message)


def _count_per_shard(urls: list[str], expected: dict[str, int], handler: SkipCounter):
    """A webdataset stage: passes samples through and checks each shard's count against the manifest
    (Python's tarfile ends a damaged archive silently, so a short count is the only sign)."""
    position = {url: i for i, url in enumerate(urls)}

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        counts, checked = dict.fromkeys(urls, 0), 0

        def check_before(index: int) -> None:  # shards are read in order: those before `index` are done
            nonlocal checked
            for url in urls[checked:index]:
                if url in expected and counts[url] != expected[url]:
                    handler.short_shard(url, counts[url], expected[url])
            checked = max(checked, index)

        for sample in samples:
            url = sample.get("__url__")
            if url in position:
                check_before(position[url])
                counts[url] += 1
            yield sample
        check_before(len(urls))
    return stage


def raw_stream(urls: list[str], handler: SkipCounter, shuffle_buffer: int = 0, shuffle_seed: int = 0,
               expected: dict[str, int] | None = None, checksums: dict[str, str] | None = None) -> Iterator[dict]:
    """The shards' samples undecoded (webdataset's dicts: __key__, __url__, input_ids.npy bytes), in
    order or through a seeded shuffle buffer. Reading tar members is cheap and decoding is not, so the
    training stream reads everything but decodes only the batches it serves.
    `expected` (url -> samples, from the manifest) makes a short shard count as skipped samples;
    `checksums` (url -> sha256, data.verify) leaves out a shard whose bytes changed (SkipCounter.verified)."""
    if checksums is not None:
        urls = [url for url in urls if handler.verified(url, checksums.get(url))]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                             empty_check=False, handler=handler, select_files=_is_payload)
    if expected is not None:
        dataset = dataset.compose(_count_per_shard(urls, expected, handler))
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=shuffle_seed)
    yield from dataset


def shard_stream(urls: list[str], seq_len: int, vocab_size: int, handler: SkipCounter,
                 shuffle_buffer: int = 0, shuffle_seed: int = 0, expected: dict[str, int] | None = None,
                 checksums: dict[str, str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, ids) of raw_stream's samples; an undecodable one is skipped and counted (strict: refused)."""
    for sample in raw_stream(urls, handler, shuffle_buffer, shuffle_seed, expected, checksums):
        try:
            yield decode_sample(sample, seq_len, vocab_size)
        except CorruptSampleError as err:
            handler.bad_sample(err, sample.get("__url__", "?"), sample.get("__key__", "?"))


def _is_payload(name: str) -> bool:
    if name.startswith("/") or ".." in name.split("/"):
        raise CorruptSampleError(f"unsafe tar member name {name!r}", "a shard", "use shards written by data_prep only")
    return name.endswith(".input_ids.npy")
