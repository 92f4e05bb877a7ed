"""Checks that run before any heavy work (before deepspeed.initialize and the first step).

Everything about the data, the model's shape, the ranks' shares and the checkpoint to resume that
can be known from small files is checked here, once, and each failure names the file or key:
a bad input should cost seconds, not a queued job's start-up and its first hour.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import Config, ConfigError, candidates_per_micro_step, to_dict
from pipeline.data import CorruptSampleError, SampleMismatchError, SkipCounter, micro_steps_per_epoch, shard_stream
from pipeline.manifest import DataError, Manifest

log = logging.getLogger(__name__)
SPECIAL_TOKENS = {"cls": "cls_token_id", "sep": "sep_token_id", "pad": "pad_token_id", "mask": "mask_token_id",
                  "unk": "unk_token_id"}


def check_run(cfg: Config, world_size: int, manifest: Manifest) -> None:
    """All the checks below, cheapest first."""
    check_model_fits(cfg, manifest)
    check_rank_shares(cfg, manifest, world_size)
    check_resume(cfg, world_size)
    check_shard_sizes(manifest, strict=cfg.data.strict)
    check_tokenizer(manifest)
    check_first_sample(manifest, strict=cfg.data.strict)


def check_model_fits(cfg: Config, manifest: Manifest) -> None:
    """What the model's shape must agree with in the data (the shape itself is checked in pipeline.config)."""
    m = cfg.model
    if m.max_position and manifest.seq_len > m.max_position:
        raise ConfigError(f"model.max_position: {m.max_position} is smaller than the data's seq_len "
                          f"{manifest.seq_len} ({manifest.path})")
    if cfg.data.eval_samples > manifest.split_samples("val"):
        log.warning("data.eval_samples %d > %d validation samples: evaluating on all of them",
                    cfg.data.eval_samples, manifest.split_samples("val"))


def check_rank_shares(cfg: Config, manifest: Manifest, world_size: int) -> None:
    """Every rank reads whole train shards and needs one candidate micro-batch per epoch at least;
    every rank evaluates on at least one validation sample."""
    train = manifest.shards("train")
    if len(train) < world_size:
        raise DataError(f"{manifest.path}: {len(train)} train shard(s) cannot be dealt to {world_size} ranks (each "
                        "rank reads whole shards): use fewer ranks or re-shard with smaller --samples-per-shard")
    batch = candidates_per_micro_step(cfg)
    if micro_steps_per_epoch(manifest, 0, cfg.train.seed, world_size, batch) == 0:
        raise DataError(f"{manifest.path}: too few train samples per rank for one micro-batch of {batch} candidates "
                        f"(train.micro_batch x select.oversample) on {world_size} ranks")
    if not manifest.shards("val"):
        raise DataError(f"{manifest.path}: lists no validation shards (build with --val-fraction > 0)")
    if min(cfg.data.eval_samples, manifest.split_samples("val")) < world_size:
        raise DataError(f"{manifest.path}: {manifest.split_samples('val')} validation samples "
                        f"(data.eval_samples {cfg.data.eval_samples}) cannot give each of {world_size} ranks one")


def check_resume(cfg: Config, world_size: int) -> None:
    """The checkpoint a restart would resume: same number of ranks, same model, plain weights only."""
    ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
    tags = checkpoint.complete_tags(ckpt_dir) if cfg.train.resume else []
    if not tags:
        return
    tag_dir = ckpt_dir / tags[-1]
    saved_world = json.loads((tag_dir / checkpoint.MARKER).read_text()).get("world_size")
    if saved_world != world_size:
        raise ConfigError(f"train.out_dir: {tag_dir} was saved with {saved_world} ranks, resuming with {world_size}: "
                          "exact resumption needs the same number of ranks (or a new train.out_dir)")
    saved_config = Path(cfg.train.out_dir) / "config.json"
    if saved_config.is_file():
        saved_model = json.loads(saved_config.read_text()).get("model")
        if saved_model is not None and saved_model != to_dict(cfg)["model"]:
            raise ConfigError(f"train.out_dir: {cfg.train.out_dir} holds checkpoints of another model ({saved_model}); "
                              "use a new train.out_dir, or train.resume=false to start over there")
    checkpoint.vet_files(tag_dir)


def check_shard_sizes(manifest: Manifest, strict: bool) -> None:
    """A local shard whose size differs from the manifest's is truncated or replaced."""
    if "://" in manifest.location:
        return
    for shard in manifest.data["shards"]:
        path, size = manifest.url(shard), shard.get("bytes")
        if size is None or os.path.getsize(path) == int(size):
            continue
        message = f"{path}: {os.path.getsize(path)} bytes, the manifest says {size} (truncated or replaced)"
        if strict:
            raise DataError(f"{message}; data.strict=true")
        log.warning("%s: its unreadable samples will be skipped and counted (data/skipped_corrupt)", message)


def check_tokenizer(manifest: Manifest) -> None:
    """The tokenizer directory is the one the shards were built with: size, vocab hash, special ids."""
    from transformers import AutoTokenizer

    tok_dir = manifest.tokenizer_dir()
    if "://" not in tok_dir and not os.path.isdir(tok_dir):
        raise DataError(f"{tok_dir}: tokenizer directory not found ({manifest.path} names it)")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if len(tokenizer) != manifest.vocab_size:
        raise DataError(f"{tok_dir}: tokenizer has {len(tokenizer)} tokens but {manifest.path} says vocab_size "
                        f"{manifest.vocab_size}: shards and tokenizer do not match")
    expected = manifest.data["tokenizer"].get("vocab_sha256")
    if expected and vocab_sha256(tokenizer) != expected:
        raise DataError(f"{tok_dir}: its vocab differs from the one the shards were built with "
                        f"(vocab_sha256 in {manifest.path}): shards and tokenizer do not match")
    for name, attribute in SPECIAL_TOKENS.items():
        have = getattr(tokenizer, attribute, None)
        if name in manifest.special_ids and have is not None and have != manifest.special_ids[name]:
            raise DataError(f"{tok_dir}: [{name.upper()}] is id {have} but {manifest.path} says "
                            f"{manifest.special_ids[name]}: shards and tokenizer do not match")


def vocab_sha256(tokenizer) -> str:
    """sha256 of the vocab as vocab.txt holds it, one token per line in id order (as data_prep writes it)."""
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(("\n".join(sorted(vocab, key=vocab.get)) + "\n").encode("utf-8")).hexdigest()


def check_first_sample(manifest: Manifest, strict: bool) -> None:
    """The first train sample fits the manifest (length seq_len, ids below vocab_size): shards built
    for another seq_len or tokenizer fail here, not after every sample has been skipped."""
    url = manifest.url(manifest.shards("train")[0])
    try:
        next(iter(shard_stream([url], manifest.seq_len, manifest.vocab_size, SkipCounter(strict=True))), None)
    except SampleMismatchError as err:
        raise DataError(f"the shards do not match {manifest.path} (seq_len {manifest.seq_len}, vocab_size "
                        f"{manifest.vocab_size}): {err}") from err
    except CorruptSampleError as err:
        if strict:
            raise DataError(f"{err}") from err
        log.warning("first train shard: %s (its broken samples will be skipped and counted)", err)
