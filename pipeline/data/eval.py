"""The fixed eval set: the first validation samples, dealt to ranks, masked with a fixed seed."""
from __future__ import annotations

import numpy as np

from pipeline.data.candidates import masked_batch
from pipeline.data.shards import SkipCounter, shard_stream
from pipeline.errors import DataError
from pipeline.manifest import Manifest
from pipeline.masking import EVAL_MASK_SEED, MaskSpec


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
    return [masked_batch(mine[i:i + batch], EVAL_MASK_SEED, 0, spec) for i in range(0, len(mine), batch)]
