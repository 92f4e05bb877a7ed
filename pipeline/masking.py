"""BERT's dynamic masking, seeded per sample, and the label convention every part shares.

Labels are the original token ids at the chosen positions and IGNORE_INDEX elsewhere; the model,
the scorer and the evaluation all read masked positions as `labels != IGNORE_INDEX`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

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
