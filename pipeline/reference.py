"""The context-free reference of a run's eval set: what a model that ignores the context scores at
the [MASK] positions. It says which regime a run is in: at the reference the model predicts the most
frequent words (there a high loss means "rare word"); above it, it has learnt from the context.

- eval/mask_accuracy_ref: accuracy of always answering the train split's most frequent token;
- eval/unigram_ce: cross-entropy of the train split's unigram distribution (add-one smoothed).
Both at the eval set's [MASK] positions, from the train split's token counts (a sample of it on
large corpora), logged once per run.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.data import SkipCounter, shard_stream
from pipeline.distributed import DistInfo, all_reduce_sum
from pipeline.manifest import Manifest
from pipeline.masking import IGNORE_INDEX

log = logging.getLogger(__name__)


def train_unigram_counts(manifest: Manifest, max_samples: int = 50_000) -> np.ndarray:
    """(vocab,) token counts over the train split (its first max_samples samples), special tokens excluded."""
    counts = np.zeros(manifest.vocab_size, dtype=np.int64)
    urls = [manifest.url(s) for s in manifest.shards("train")]
    samples = 0
    for _, ids in shard_stream(urls, manifest.seq_len, manifest.vocab_size, SkipCounter(strict=False)):
        counts += np.bincount(ids.astype(np.int64), minlength=manifest.vocab_size)
        samples += 1
        if samples >= max_samples:
            log.info("unigram counts from the first %d train samples", samples)
            break
    counts[sorted(set(manifest.special_ids.values()))] = 0
    return counts


def context_free_reference(counts: np.ndarray, batches: list[dict], mask_id: int, info: DistInfo
                           ) -> dict[str, float]:
    """The reference metrics at the [MASK] positions of this rank's eval batches, summed over ranks."""
    probs = torch.from_numpy((counts + 1.0) / (counts.sum() + counts.size))  # add-one: no token has p = 0
    top = int(counts.argmax())
    sums = torch.zeros(3, dtype=torch.float64)  # positions, most-frequent hits, cross-entropy
    for batch in batches:
        at_mask = (batch["input_ids"] == mask_id) & (batch["labels"] != IGNORE_INDEX)
        targets = batch["labels"][at_mask]
        sums += torch.stack([torch.tensor(float(targets.numel()), dtype=torch.float64),
                             (targets == top).sum().double(), -probs[targets].log().sum()])
    sums = all_reduce_sum(sums.to(info.device), info).cpu()
    positions = max(float(sums[0]), 1.0)
    return {"eval/mask_accuracy_ref": float(sums[1]) / positions, "eval/unigram_ce": float(sums[2]) / positions}
