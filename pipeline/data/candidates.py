"""The training stream: micro-batches of candidates for one rank, epoch after epoch, and its DataLoader.

Per epoch, the train shards are permuted (seeded by run seed and epoch) and dealt to ranks
round-robin, so ranks read disjoint shards. Every rank yields the same number of micro-batches per
epoch (the smallest rank's share), so no rank runs out first and hangs a collective.

The epoch's samples pass the seeded shuffle buffer undecoded and are cut into micro-batches by
position (EpochStream). A loader worker reads the whole stream, which is cheap, but decodes and
masks only the batches it serves, so no sample is decoded twice and the batches and their order do
not depend on the number of workers. Masking is seeded per sample (run seed, epoch, sample key).
A resume reads the micro-batches consumed before it (the shuffle buffer needs them) without decoding
them, which gives back exactly the stream an unbroken run sees. One DataLoader serves a whole run:
its workers go on from epoch to epoch instead of being started again.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.shards import CorruptSampleError, SkipCounter, decode_sample, raw_stream
from pipeline.errors import DataError
from pipeline.manifest import Manifest
from pipeline.masking import MaskSpec, mask_tokens, sample_seed

log = logging.getLogger(__name__)

Decoded = tuple[str, np.ndarray]  # (sample key, token ids)
RawItem = tuple[dict, bool]  # (webdataset's undecoded sample, fresh: False on a second pass over a short stream)


def rank_shards(manifest: Manifest, epoch: int, seed: int, rank: int, world: int) -> list[list[dict]]:
    """Train shards of every rank for this epoch: a seeded permutation dealt round-robin."""
    shards = manifest.shards("train")
    order = np.random.default_rng([seed, epoch, 7]).permutation(len(shards))
    return [[shards[i] for i in order[r::world]] for r in range(world)]


def micro_steps_per_epoch(manifest: Manifest, epoch: int, seed: int, world: int, batch: int) -> int:
    per_rank = rank_shards(manifest, epoch, seed, 0, world)
    return min(sum(s["samples"] for s in shards) for shards in per_rank) // batch


def require_micro_steps(manifest: Manifest, epoch: int, seed: int, world: int, batch: int) -> int:
    """micro_steps_per_epoch, refused when it is 0 (the run would wait forever for a batch)."""
    steps = micro_steps_per_epoch(manifest, epoch, seed, world, batch)
    if steps == 0:
        raise DataError(f"too few train samples for one micro-batch of {batch} per rank on {world} ranks",
                        manifest.path, "use a smaller train.micro_batch or more data")
    return steps


def masked_batch(items: list[Decoded], seed: int, epoch: int, spec: MaskSpec) -> dict:
    """keys, input_ids (B, T) and labels (B, T), -100 where not masked; each sample masked with a
    seed of its own (run seed, epoch, key), so its mask does not depend on who masks it."""
    inputs, labels = zip(*(mask_tokens(ids, np.random.default_rng(sample_seed(seed, epoch, key)), spec)
                           for key, ids in items))
    return {"keys": [key for key, _ in items], "input_ids": torch.from_numpy(np.stack(inputs)),
            "labels": torch.from_numpy(np.stack(labels))}


def worker_split() -> tuple[int, int]:
    """(this loader worker, number of workers); (0, 1) outside a DataLoader worker."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class EpochStream:
    """One rank's epoch as one process reads it: the undecoded samples in the epoch's shuffled order
    (the stream repeated if corrupt data made it short), cut into `steps` micro-batches of `batch`;
    and a batch it serves, decoded and masked. Every process reading it cuts the same batches."""

    def __init__(self, manifest: Manifest, spec: MaskSpec, *, batch: int, epoch: int, seed: int, rank: int,
                 world: int, shuffle_buffer: int, strict: bool, verify: bool) -> None:
        self.manifest, self.spec, self.batch, self.epoch, self.seed, self.rank = manifest, spec, batch, epoch, seed, rank
        shards = rank_shards(manifest, epoch, seed, rank, world)[rank]
        self.urls = [manifest.url(s) for s in shards]
        self.expected = {manifest.url(s): int(s["samples"]) for s in shards}
        self.checksums = {manifest.url(s): s.get("sha256", "") for s in shards} if verify else None
        self.shuffle_buffer = shuffle_buffer
        self.steps = require_micro_steps(manifest, epoch, seed, world, batch)
        self.handler = SkipCounter(strict)
        self.padded = 0  # samples repeated to make up for a short stream
        self._first: Decoded | None = None  # the epoch's first decodable sample, once a batch needs it

    def raw_batches(self) -> Iterator[list[RawItem]]:
        """The epoch's `steps` micro-batches, undecoded."""
        pending: list[RawItem] = []
        for item in self._raw_samples():
            pending.append(item)
            if len(pending) == self.batch:
                yield pending
                pending = []

    def served(self, raw: list[RawItem], index: int) -> dict:
        """Micro-batch `index` decoded and masked. "faults" carries the epoch's stream counts so far
        (the same in every process) and this batch's undecodable samples (only its server knows them):
        a loader worker's own counters never reach the training process. "position" is (epoch, index)."""
        decoded, lost = [], 0
        for sample, fresh in raw:
            decoded.append(self._decode(sample, fresh))
            lost += decoded[-1] is None and fresh  # a second pass repeats samples counted the first time
        batch = masked_batch(self._filled(decoded), self.seed, self.epoch, self.spec)
        batch["faults"] = (self.handler.skipped, self.padded, self.handler.skipped_shards, lost)
        batch["position"] = (self.epoch, index)
        return batch

    def _read(self, handler: SkipCounter) -> Iterator[dict]:
        seed = (self.seed * 1_000_003 + self.epoch) * 1009 + self.rank
        return raw_stream(self.urls, handler, self.shuffle_buffer, seed, self.expected, self.checksums)

    def _raw_samples(self) -> Iterator[RawItem]:
        """The epoch's stream; if corrupt data made it short, it starts over (counted as padding)."""
        needed, produced, fresh = self.steps * self.batch, 0, True
        while produced < needed:
            before = produced
            for sample in self._read(self.handler):
                yield sample, fresh
                produced += 1
                if produced >= needed:
                    return
            if produced == before:
                raise self._nothing_readable()
            self.padded += needed - produced
            log.warning("rank %d epoch %d: stream short by %d samples (corrupt data?); repeating it",
                        self.rank, self.epoch, needed - produced)
            fresh = False

    def _decode(self, sample: dict, fresh: bool) -> Decoded | None:
        """The sample's (key, ids), or None if it does not decode (data.strict=true: refused)."""
        try:
            return decode_sample(sample, self.manifest.seq_len, self.spec.vocab_size)
        except CorruptSampleError as err:
            self.handler.refuse_if_strict(err)
            if fresh:
                log.warning("skipping a corrupt sample, its place in the micro-batch taken by a repeat "
                            "(counted in data/skipped_corrupt): %s", err)
            return None

    def _filled(self, decoded: list[Decoded | None]) -> list[Decoded]:
        """An undecodable sample's place goes to its batch's first decodable sample, or to the epoch's
        first one if the batch has none: a rule each worker applies alone, whoever serves the batch."""
        if all(item is not None for item in decoded):
            return decoded
        good = next((item for item in decoded if item is not None), None)
        good = good if good is not None else self._first_decodable()
        return [good if item is None else item for item in decoded]

    def _first_decodable(self) -> Decoded:
        if self._first is None:
            again = SkipCounter(strict=False)  # a second look: this stream's faults are counted already
            self._first = next((item for item in (self._decode(s, False) for s in self._read(again))
                                if item is not None), None)
            if self._first is None:
                raise self._nothing_readable()
        return self._first

    def _nothing_readable(self) -> CorruptSampleError:
        return CorruptSampleError(f"rank {self.rank} found no readable sample in its shards",
                                  ", ".join(self.urls)[:300], "restore or rebuild the shards")


class CandidateBatches(torch.utils.data.IterableDataset):
    """Candidate micro-batches of one rank from micro-batch `start` of `epoch`, for `epochs` epochs
    (None: without end, as a run reads them); each carries "position" (epoch, index in the epoch).

    In a DataLoader of W workers the n-th batch from the start is worker n % W's, the order in which
    the DataLoader's round-robin takes them: the stream is the same for any W and any start."""

    def __init__(self, manifest: Manifest, spec: MaskSpec, *, batch: int, epoch: int, seed: int, rank: int,
                 world: int, start: int, shuffle_buffer: int, strict: bool, verify: bool = True,
                 epochs: int | None = 1) -> None:
        super().__init__()
        self.options = {"manifest": manifest, "spec": spec, "batch": batch, "seed": seed, "rank": rank,
                        "world": world, "shuffle_buffer": shuffle_buffer, "strict": strict, "verify": verify}
        self.epoch, self.start, self.epochs = epoch, start, epochs
        self.steps = require_micro_steps(manifest, epoch, seed, world, batch)  # of the first epoch

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_split()
        served = 0  # batches given out since the start, by all workers together
        epochs = itertools.count(self.epoch) if self.epochs is None else range(self.epoch, self.epoch + self.epochs)
        for epoch in epochs:
            stream = EpochStream(epoch=epoch, **self.options)
            start = self.start if epoch == self.epoch else 0
            if start >= stream.steps:
                continue  # resumed from a checkpoint at the epoch's very end
            for index, raw in enumerate(stream.raw_batches()):
                if index < start:
                    continue  # consumed before the resume: read, never decoded
                if served % workers == worker:
                    yield stream.served(raw, index)
                served += 1


@dataclass
class DataFaults:
    """This rank's corrupt samples skipped and samples repeated (padding a short stream, or taking an
    undecodable sample's place), over the run, and the most shards it left out in one epoch (their
    checksum changed: data.verify).

    A batch carries its epoch's stream counts so far, of which only the growth over the last batch seen
    is new (a resumed epoch re-reads its start), and its own undecodable samples, each skipped and its
    place repeated."""
    skipped: int = 0
    repeated: int = 0
    epoch_skipped: int = 0
    epoch_repeated: int = 0
    skipped_shards: int = 0

    def update(self, batch: dict) -> dict:
        """Take the counts off a batch (returned without them)."""
        skipped, repeated, shards, lost = batch.pop("faults")
        self.skipped += max(0, skipped - self.epoch_skipped) + lost
        self.repeated += max(0, repeated - self.epoch_repeated) + lost
        self.epoch_skipped, self.epoch_repeated = max(skipped, self.epoch_skipped), max(repeated, self.epoch_repeated)
        self.skipped_shards = max(self.skipped_shards, shards)
        return batch

    def end_epoch(self) -> None:
        self.epoch_skipped = self.epoch_repeated = 0


def loader_kwargs(device_type: str, num_workers: int, seed: int, epoch: int) -> dict[str, Any]:
    """The DataLoader's arguments. On CUDA the loader's thread puts batches in pinned (page-locked)
    memory, so that to_device's copy to the GPU does not block; a CPU run is left as it was.
    Its own generator: creating a DataLoader iterator draws a base seed, and drawing it from the
    global RNG would shift the dropout masks of a resumed run."""
    return {"batch_size": None, "num_workers": num_workers, "pin_memory": device_type == "cuda",
            "generator": torch.Generator().manual_seed(seed * 1009 + epoch)}


def train_loader(manifest: Manifest, spec: MaskSpec, *, batch: int, epoch: int, seed: int, rank: int,
                 world: int, start: int, shuffle_buffer: int, strict: bool, num_workers: int, verify: bool = True,
                 epochs: int | None = 1, device_type: str = "cpu"
                 ) -> tuple[torch.utils.data.DataLoader, CandidateBatches]:
    """A DataLoader over CandidateBatches. A run asks for epochs=None and iterates it once, so that its
    workers live as long as the run (pipeline/run.py)."""
    dataset = CandidateBatches(manifest, spec, batch=batch, epoch=epoch, seed=seed, rank=rank, world=world,
                               start=start, shuffle_buffer=shuffle_buffer, strict=strict, verify=verify, epochs=epochs)
    return torch.utils.data.DataLoader(dataset, **loader_kwargs(device_type, num_workers, seed, epoch)), dataset
