"""Streaming MLM batches from the data_prep shards with webdataset.

Per epoch, the train shards are permuted (seeded by run seed and epoch) and dealt to ranks
round-robin, so ranks read disjoint shards. Every rank yields the same number of micro-batches per
epoch (the smallest rank's share), so no rank runs out first and hangs a collective.
Masking is seeded per sample (run seed, epoch, sample key): the same sample gets the same mask
whatever the number of loader workers. Resuming skips the micro-batches already consumed in the
epoch, which gives back exactly the stream an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from pipeline.errors import DataError
from pipeline.manifest import Manifest
from pipeline.masking import EVAL_MASK_SEED, MaskSpec, mask_tokens, sample_seed

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
        ids = np.load(io.BytesIO(payload), allow_pickle=False)
    except Exception as err:  # numpy raises ValueError/OSError/EOFError on bad bytes or pickles
        raise CorruptSampleError(f"sample {key!r} is not a plain .npy array ({err})", url) from err
    if ids.ndim != 1 or ids.shape[0] != seq_len or ids.dtype.kind not in "iu":
        raise SampleMismatchError(f"sample {key!r}: expected {seq_len} integer ids, got {ids.dtype}{ids.shape}", url)
    if ids.size and int(ids.max()) >= vocab_size:
        raise SampleMismatchError(f"sample {key!r}: token id {int(ids.max())} >= vocab size {vocab_size}", url)
    return key, ids


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
        if self.strict:
            raise type(err)(f"{err.what}, with data.strict=true", err.where, err.fix) from err
        self._count((url, key), 1, str(err))

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


def shard_stream(urls: list[str], seq_len: int, vocab_size: int, handler: SkipCounter,
                 shuffle_buffer: int = 0, shuffle_seed: int = 0, expected: dict[str, int] | None = None,
                 checksums: dict[str, str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, ids) from the given shards in order, optionally through a seeded shuffle buffer.
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
    for sample in dataset:
        try:
            yield decode_sample(sample, seq_len, vocab_size)
        except CorruptSampleError as err:
            handler.bad_sample(err, sample.get("__url__", "?"), sample.get("__key__", "?"))


def _is_payload(name: str) -> bool:
    if name.startswith("/") or ".." in name.split("/"):
        raise CorruptSampleError(f"unsafe tar member name {name!r}", "a shard", "use shards written by data_prep only")
    return name.endswith(".input_ids.npy")


def rank_shards(manifest: Manifest, epoch: int, seed: int, rank: int, world: int) -> list[list[dict]]:
    """Train shards of every rank for this epoch: a seeded permutation dealt round-robin."""
    shards = manifest.shards("train")
    order = np.random.default_rng([seed, epoch, 7]).permutation(len(shards))
    return [[shards[i] for i in order[r::world]] for r in range(world)]


def micro_steps_per_epoch(manifest: Manifest, epoch: int, seed: int, world: int, batch: int) -> int:
    per_rank = rank_shards(manifest, epoch, seed, 0, world)
    return min(sum(s["samples"] for s in shards) for shards in per_rank) // batch


class CandidateBatches(torch.utils.data.IterableDataset):
    """Micro-batches of candidates for one rank and one epoch, starting at micro-step `start`.

    Each loader worker reads the rank's whole stream (cheap) but decodes and masks only the
    batches b with b % num_workers == worker, so the DataLoader's round-robin gives back the
    single-process order for any number of workers.
    """

    def __init__(self, manifest: Manifest, spec: MaskSpec, *, batch: int, epoch: int, seed: int,
                 rank: int, world: int, start: int, shuffle_buffer: int, strict: bool, verify: bool = True) -> None:
        super().__init__()
        self.manifest, self.spec, self.batch, self.epoch, self.seed = manifest, spec, batch, epoch, seed
        self.rank, self.start, self.shuffle_buffer = rank, start, shuffle_buffer
        shards = rank_shards(manifest, epoch, seed, rank, world)[rank]
        self.urls = [manifest.url(s) for s in shards]
        self.expected = {manifest.url(s): int(s["samples"]) for s in shards}
        self.checksums = {manifest.url(s): s.get("sha256", "") for s in shards} if verify else None
        self.steps = micro_steps_per_epoch(manifest, epoch, seed, world, batch)
        self.handler = SkipCounter(strict)
        self.padded = 0  # samples repeated to make up for a short stream

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pending: list[tuple[str, np.ndarray]] = []
        step = 0
        for item in self._samples():
            pending.append(item)
            if len(pending) < self.batch:
                continue
            if step >= self.start and step % workers == worker:
                yield self._collate(pending)
            pending, step = [], step + 1
            if step >= self.steps:
                return

    def _samples(self) -> Iterator[tuple[str, np.ndarray]]:
        """The epoch's stream; if corrupt data made it short, it starts over (counted as padding)."""
        needed = self.steps * self.batch
        produced = 0
        while produced < needed:
            before = produced
            for item in shard_stream(self.urls, self.manifest.seq_len, self.spec.vocab_size, self.handler,
                                     self.shuffle_buffer, shuffle_seed=(self.seed * 1_000_003 + self.epoch) * 1009 + self.rank,
                                     expected=self.expected, checksums=self.checksums):
                yield item
                produced += 1
                if produced >= needed:
                    return
            if produced == before:
                raise CorruptSampleError(f"rank {self.rank} found no readable sample in its shards",
                                         ", ".join(self.urls)[:300], "restore or rebuild the shards")
            self.padded += needed - produced
            log.warning("rank %d epoch %d: stream short by %d samples (corrupt data?); repeating it",
                        self.rank, self.epoch, needed - produced)

    def _collate(self, items: list[tuple[str, np.ndarray]]) -> dict:
        inputs, labels = zip(*(mask_tokens(ids, np.random.default_rng(sample_seed(self.seed, self.epoch, key)),
                                           self.spec) for key, ids in items))
        return {"keys": [key for key, _ in items],
                "input_ids": torch.from_numpy(np.stack(inputs)),  # (B, T)
                "labels": torch.from_numpy(np.stack(labels)),  # (B, T), -100 where not masked
                # counts so far in this epoch's stream; carried by the batch since a loader worker's
                # own counters never reach the training process
                "faults": (self.handler.skipped, self.padded, self.handler.skipped_shards)}


@dataclass
class DataFaults:
    """This rank's corrupt samples skipped and samples repeated (padding a short stream), over the run,
    and the most shards it left out in one epoch (their checksum changed: data.verify).

    Batches carry the counts since their epoch began; a resumed epoch re-reads its start and counts
    those again, so only the growth over the last batch seen is added."""
    skipped: int = 0
    repeated: int = 0
    epoch_skipped: int = 0
    epoch_repeated: int = 0
    skipped_shards: int = 0

    def update(self, batch: dict) -> dict:
        """Take the counts off a batch (returned without them)."""
        skipped, repeated, shards = batch.pop("faults")
        self.skipped += max(0, skipped - self.epoch_skipped)
        self.repeated += max(0, repeated - self.epoch_repeated)
        self.epoch_skipped, self.epoch_repeated = max(skipped, self.epoch_skipped), max(repeated, self.epoch_repeated)
        self.skipped_shards = max(self.skipped_shards, shards)
        return batch

    def end_epoch(self) -> None:
        self.epoch_skipped = self.epoch_repeated = 0


def train_loader(manifest: Manifest, spec: MaskSpec, *, batch: int, epoch: int, seed: int, rank: int,
                 world: int, start: int, shuffle_buffer: int, strict: bool, num_workers: int, verify: bool = True
                 ) -> tuple[torch.utils.data.DataLoader, CandidateBatches]:
    dataset = CandidateBatches(manifest, spec, batch=batch, epoch=epoch, seed=seed, rank=rank, world=world,
                               start=start, shuffle_buffer=shuffle_buffer, strict=strict, verify=verify)
    # Its own generator: creating a DataLoader iterator draws a base seed, and drawing it from the
    # global RNG would shift the dropout masks of a resumed run.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(seed * 1009 + epoch))
    return loader, dataset


def eval_batches(manifest: Manifest, spec: MaskSpec, *, samples: int, batch: int, rank: int, world: int,
                 strict: bool = True, verify: bool = True) -> list[dict]:
    """This rank's share of the first `samples` validation samples, masked with a fixed seed.

    Every rank gets the same number of batches (ZeRO-3 needs every rank in every forward). Strict by
    default: an eval set with a damaged or changed shard would make every curve wrong."""
    urls = [manifest.url(s) for s in manifest.shards("val")]
    if not urls:
        raise DataError("the manifest lists no validation shards", manifest.path,
                        "rebuild with python -m data_prep build --val-fraction 0.05")
    per_rank = min(samples, manifest.split_samples("val")) // world
    if per_rank == 0:
        raise DataError(f"{manifest.split_samples('val')} validation samples cannot give each of {world} ranks one",
                        manifest.path, "use fewer ranks or rebuild with a larger --val-fraction")
    mine: list[tuple[str, np.ndarray]] = []
    expected = {manifest.url(s): int(s["samples"]) for s in manifest.shards("val")}
    checksums = {manifest.url(s): s.get("sha256", "") for s in manifest.shards("val")} if verify else None
    stream = shard_stream(urls, manifest.seq_len, spec.vocab_size, SkipCounter(strict), expected=expected,
                          checksums=checksums)
    for index, item in enumerate(stream):
        if index >= per_rank * world:
            break
        if index % world == rank:
            mine.append(item)
    batches = []
    for i in range(0, len(mine), batch):
        items = mine[i:i + batch]
        inputs, labels = zip(*(mask_tokens(ids, np.random.default_rng(sample_seed(EVAL_MASK_SEED, 0, key)), spec)
                               for key, ids in items))
        batches.append({"keys": [k for k, _ in items], "input_ids": torch.from_numpy(np.stack(inputs)),
                        "labels": torch.from_numpy(np.stack(labels))})
    return batches

