"""The training stream: micro-batches of candidates for one rank.

Per epoch, the train shards are permuted (seeded by run seed and epoch) and dealt to ranks
round-robin, so ranks read disjoint shards. Every rank yields the same number of micro-batches per
epoch (the smallest rank's share), so no rank runs out first and hangs a collective.
Masking is seeded per sample (run seed, epoch, sample key): the same sample gets the same mask
whatever the number of loader workers. Resuming skips the micro-batches already consumed in the
epoch, which gives back exactly the stream an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.shards import CorruptSampleError, SkipCounter, shard_stream
from pipeline.manifest import Manifest
from pipeline.masking import MaskSpec, mask_tokens, sample_seed

log = logging.getLogger(__name__)


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
