"""BERT's dynamic masking, seeded per sample, and the label convention every part shares.

Labels are the original token ids at the chosen positions and IGNORE_INDEX elsewhere; the model,
the scorer and the evaluation all read masked positions as `labels != IGNORE_INDEX`, exactly
(`masked_positions` without a capacity) or as a fixed number of positions (with one: static shapes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # labels of positions that are not predicted (torch's cross_entropy default)
EVAL_MASK_SEED = 20240207  # fixed: eval masks identical across runs, seeds and policies


@dataclass(frozen=True)
class MaskSpec:
    mask_prob: float
    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    mask_share: float = 0.8  # of the chosen tokens: become [MASK]
    random_share: float = 0.1  # ... become a random token; the rest are kept as they are


def mask_spec(data_cfg, manifest) -> MaskSpec:
    """The masking of a run: `data.*` from its config (pipeline.config.DataConfig), ids from the manifest."""
    return MaskSpec(data_cfg.mask_prob, manifest.vocab_size, manifest.special_ids["mask"],
                    tuple(sorted(set(manifest.special_ids.values()))), data_cfg.mask_share, data_cfg.random_share)


def eval_mask_spec(data_cfg, manifest) -> MaskSpec:
    """The eval set's masking: the run's, at data.eval_mask_prob, so that runs training with another
    masking rate are still measured on the same positions."""
    return dataclasses.replace(mask_spec(data_cfg, manifest), mask_prob=data_cfg.eval_mask_prob)


def sample_seed(seed: int, epoch: int, key: str) -> list[int]:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return [seed, epoch, int.from_bytes(digest, "little")]


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, spec: MaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """BERT's dynamic masking: pick mask_prob of the non-special tokens; of those 80% [MASK], 10% random,
    10% kept (spec.mask_share / random_share)."""
    ids = ids.astype(np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    candidates = ~np.isin(ids, spec.special_ids)
    chosen = candidates & (rng.random(ids.shape) < spec.mask_prob)
    labels[chosen] = ids[chosen]
    action = rng.random(ids.shape)
    inputs = ids.copy()
    mask_until = spec.mask_share
    random_until = spec.mask_share + spec.random_share
    inputs[chosen & (action < mask_until)] = spec.mask_id
    randomize = chosen & (action >= mask_until) & (action < random_until)
    inputs[randomize] = rng.integers(0, spec.vocab_size, size=int(randomize.sum()))
    return inputs, labels


def head_capacity(rows: int, seq_len: int, mask_prob: float) -> int:
    """Masked positions the static head makes room for in a (rows, seq_len) batch: the expected count
    plus six standard deviations (a binomial count goes past it about once in 10^9 batches), rounded
    up to a multiple of 8."""
    n = rows * seq_len
    expected = mask_prob * n + 6.0 * math.sqrt(mask_prob * (1.0 - mask_prob) * n) + 8
    return min(n, int(math.ceil(expected / 8.0)) * 8)


def masked_positions(labels: torch.Tensor, capacity: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat positions, their targets, masked count) of a (B, T) label batch.

    capacity None: exactly the masked positions (a data-dependent shape: a host sync on a GPU).
    capacity C: always C positions, the masked ones first in order, the rest padding with target
    IGNORE_INDEX (static shapes, no sync, as Cramming does); a batch with more than C masked tokens
    loses its last ones (head_capacity makes that about impossible)."""
    flat = labels.reshape(-1)
    is_masked = flat != IGNORE_INDEX
    if capacity is None:
        positions = is_masked.nonzero(as_tuple=True)[0]  # (N,)
        return positions, flat[positions], is_masked.sum()
    positions = torch.argsort((~is_masked).to(torch.uint8), stable=True)[:capacity]  # (C,) masked first
    return positions, torch.where(is_masked[positions], flat[positions], IGNORE_INDEX), is_masked.sum()
