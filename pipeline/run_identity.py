"""What makes a run the same run: its resolved config and its data, checked before a resume.

A checkpoint carries `run.json` (the resolved config and the data's identity). Resuming with a
config that differs in a key that changes what is trained (the model, the batch, the policy, the data,
the recipe) is refused, naming every such key; the keys that only change when to stop, how often to
log, evaluate or checkpoint, or where to track are safe, and the run records the change.
"""
from __future__ import annotations

import hashlib
from typing import Any

from pipeline.config import Config, flatten, to_dict
from pipeline.manifest import Manifest

RUN_FILE = "run.json"
SAFE_TO_CHANGE = (  # keys (or key prefixes ending in ".") a resumed run may change
    "train.max_steps", "train.max_seconds", "train.target_accuracy", "train.target_mask_accuracy",
    "train.eval_every", "train.eval_every_s",
    "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.max_nonfinite_in_a_row",
    "train.threads", "train.export", "train.record_keys", "train.resume", "train.init_from", "train.out_dir",
    "train.peak_tflops",
    "data.num_workers", "data.strict", "data.dir", "select.probe_every", "tracking.",
)


def data_identity(manifest: Manifest) -> dict[str, Any]:
    """What the data is, wherever it lies: shapes, tokenizer and every shard's checksum."""
    shards = sorted((s["name"], s.get("sha256", ""), int(s["samples"])) for s in manifest.data["shards"])
    digest = hashlib.sha256(repr(shards).encode()).hexdigest()
    return {"seq_len": manifest.seq_len, "vocab_size": manifest.vocab_size,
            "vocab_sha256": manifest.data["tokenizer"].get("vocab_sha256", ""),
            "train_samples": manifest.split_samples("train"), "val_samples": manifest.split_samples("val"),
            "shards_sha256": digest}


def public_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as it may be written anywhere (config.json, checkpoints, MLflow): credentials
    in URLs (tracking.uri's user:password@, token=...) and secret-named values redacted."""
    from pipeline.tracking.scrub import known_secrets, scrub_obj

    return scrub_obj(to_dict(cfg), known_secrets(cfg.tracking.uri))


def run_record(cfg: Config, manifest: Manifest) -> dict[str, Any]:
    return {"config": public_config(cfg), "data": data_identity(manifest)}


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def differences(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(unsafe, safe) differences between two run records, as "key: old -> new" lines."""
    old_flat = {**flatten(saved.get("config", {})), **flatten({"data_identity": saved.get("data", {})})}
    new_flat = {**flatten(new["config"]), **flatten({"data_identity": new["data"]})}
    unsafe, safe = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if old != value:
            (safe if _safe(key) else unsafe).append(f"{key}: {old!r} -> {value!r}")
    return unsafe, safe
