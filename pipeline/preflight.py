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

from pipeline import checkpoint, run_identity
from pipeline.config import Config, ConfigError, candidates_per_micro_step, to_dict
from pipeline.data import CorruptSampleError, SampleMismatchError, SkipCounter, micro_steps_per_epoch, shard_stream
from pipeline.manifest import DataError, Manifest

log = logging.getLogger(__name__)
SPECIAL_TOKENS = {"cls": "cls_token_id", "sep": "sep_token_id", "pad": "pad_token_id", "mask": "mask_token_id",
                  "unk": "unk_token_id"}


def check_run(cfg: Config, world_size: int, manifest: Manifest) -> list[str]:
    """All the checks below, cheapest first. Returns the safe config changes a resume brings."""
    check_model_fits(cfg, manifest)
    check_rank_shares(cfg, manifest, world_size)
    changes = check_resume(cfg, world_size, manifest)
    check_shard_sizes(manifest, strict=cfg.data.strict)
    check_tokenizer(manifest)
    check_first_sample(manifest, strict=cfg.data.strict)
    return changes


def check_model_fits(cfg: Config, manifest: Manifest) -> None:
    """What the model's shape must agree with in the data (the shape itself is checked in pipeline.config)."""
    m = cfg.model
    if m.max_position and manifest.seq_len > m.max_position:
        raise ConfigError(f"{m.max_position} is smaller than the data's seq_len {manifest.seq_len} ({manifest.path})",
                          "model.max_position", f"set it to {manifest.seq_len} or more, or 0 for the data's seq_len")
    if cfg.data.eval_samples > manifest.split_samples("val"):
        log.warning("data.eval_samples %d > %d validation samples: evaluating on all of them",
                    cfg.data.eval_samples, manifest.split_samples("val"))


def check_rank_shares(cfg: Config, manifest: Manifest, world_size: int) -> None:
    """Every rank reads whole train shards and needs one candidate micro-batch per epoch at least;
    every rank evaluates on at least one validation sample."""
    train = manifest.shards("train")
    if len(train) < world_size:
        raise DataError(f"{len(train)} train shard(s) cannot be dealt to {world_size} ranks (each rank reads whole "
                        "shards)", manifest.path, "use fewer ranks or re-shard with a smaller --samples-per-shard")
    batch = candidates_per_micro_step(cfg)
    if micro_steps_per_epoch(manifest, 0, cfg.train.seed, world_size, batch) == 0:
        raise DataError(f"too few train samples per rank for one micro-batch of {batch} candidates "
                        f"(train.micro_batch x select.oversample) on {world_size} ranks", manifest.path,
                        "use a smaller train.micro_batch or select.oversample, fewer ranks, or more data")
    if not manifest.shards("val"):
        raise DataError("the manifest lists no validation shards", manifest.path,
                        "rebuild with python -m data_prep build --val-fraction 0.05")
    if min(cfg.data.eval_samples, manifest.split_samples("val")) < world_size:
        raise DataError(f"{manifest.split_samples('val')} validation samples (data.eval_samples "
                        f"{cfg.data.eval_samples}) cannot give each of {world_size} ranks one", manifest.path,
                        "raise data.eval_samples, use fewer ranks, or rebuild with a larger --val-fraction")


def check_resume(cfg: Config, world_size: int, manifest: Manifest) -> list[str]:
    """The checkpoint a restart would resume: the same number of ranks, the same run (config and data,
    pipeline/run_identity.py), plain weights only. Returns the safe changes ("key: old -> new")."""
    ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
    tag = checkpoint.resumable_tag(ckpt_dir)[0] if cfg.train.resume else None
    if tag is None:
        return []  # nothing to resume (damaged checkpoints: pipeline/checkpoint.py says so at load)
    tag_dir = ckpt_dir / tag
    saved_world = json.loads((tag_dir / checkpoint.MARKER).read_text()).get("world_size")
    if saved_world != world_size:
        raise ConfigError(f"{tag_dir} was saved with {saved_world} ranks, this run has {world_size}", "train.out_dir",
                          f"resume with {saved_world} ranks (exact resumption needs them), or use a new train.out_dir")
    saved_file = tag_dir / run_identity.RUN_FILE
    if not saved_file.is_file():  # a checkpoint written before run.json existed: the model must match
        saved_file = Path(cfg.train.out_dir) / "config.json"
        saved = {"config": {"model": json.loads(saved_file.read_text()).get("model")}} if saved_file.is_file() else None
        new = {"config": {"model": to_dict(cfg)["model"]}, "data": {}}
        saved = {**saved, "data": {}} if saved else None
    else:
        saved, new = json.loads(saved_file.read_text()), run_identity.run_record(cfg, manifest)
    changes: list[str] = []
    if saved is not None:
        unsafe, changes = run_identity.differences(saved, new)
        if unsafe:
            raise ConfigError(f"this run differs from the checkpoint it would resume in {len(unsafe)} key(s): "
                              + "; ".join(unsafe), str(saved_file),
                              "resume with the checkpoint's values, or start a new run in a new train.out_dir")
    return changes


def check_shard_sizes(manifest: Manifest, strict: bool) -> None:
    """A local shard whose size differs from the manifest's is truncated or replaced."""
    if "://" in manifest.location:
        return
    for shard in manifest.data["shards"]:
        path, size = manifest.url(shard), shard.get("bytes")
        if size is None or os.path.getsize(path) == int(size):
            continue
        message = f"{os.path.getsize(path)} bytes, the manifest says {size} (truncated or replaced)"
        if strict:
            raise DataError(f"a shard is damaged: {message}", path,
                            "restore it or rebuild the shards; data.strict=false skips and counts it instead")
        log.warning("%s: %s: its unreadable samples will be skipped and counted (data/skipped_corrupt)", path, message)


def check_tokenizer(manifest: Manifest) -> None:
    """The tokenizer directory is the one the shards were built with: size, vocab hash, special ids."""
    from transformers import AutoTokenizer

    tok_dir = manifest.tokenizer_dir()
    if "://" not in tok_dir and not os.path.isdir(tok_dir):
        raise DataError(f"the tokenizer directory {manifest.path} names is missing", tok_dir,
                        "copy the whole shard directory, tokenizer/ included")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if len(tokenizer) != manifest.vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens but {manifest.path} says vocab_size "
                        f"{manifest.vocab_size}: shards and tokenizer do not match", tok_dir,
                        "use the tokenizer/ the shards were built with")
    expected = manifest.data["tokenizer"].get("vocab_sha256")
    if expected and vocab_sha256(tokenizer) != expected:
        raise DataError(f"its vocab differs from the one the shards were built with (vocab_sha256 in "
                        f"{manifest.path})", tok_dir, "use the tokenizer/ the shards were built with")
    for name, attribute in SPECIAL_TOKENS.items():
        have = getattr(tokenizer, attribute, None)
        if name in manifest.special_ids and have is not None and have != manifest.special_ids[name]:
            raise DataError(f"[{name.upper()}] is id {have} but {manifest.path} says {manifest.special_ids[name]}",
                            tok_dir, "use the tokenizer/ the shards were built with")


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
        raise DataError(f"the shards do not match their manifest (seq_len {manifest.seq_len}, vocab_size "
                        f"{manifest.vocab_size}): {getattr(err, 'what', err)} in {url}", manifest.path,
                        "rebuild the shards with data_prep") from None
    except CorruptSampleError as err:
        if strict:
            raise DataError(f"the first train shard is damaged: {err}", url,
                            "restore or rebuild it; data.strict=false skips and counts it instead") from None
        log.warning("first train shard: %s (its broken samples will be skipped and counted)", err)
