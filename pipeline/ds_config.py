"""Compose the DeepSpeed JSON: one base file plus small overrides, merged left to right.

Batch sizes, learning rate, weight decay and clipping are science knobs owned by the run config
(pipeline/config.py); they are written into the DeepSpeed dict here, in one place, and a JSON file
that sets them differently is an error naming the file.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
OWNED_BY_RUN_CONFIG = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                       "gradient_clipping")


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the repository (so `ds_configs/zero2.json` works anywhere)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"DeepSpeed JSON {path} not found (looked in the working directory and {REPO_ROOT})",
                      "train.ds_configs", "list existing files, e.g. [ds_configs/base.json, ds_configs/zero2.json]")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# the sections read here as objects; DeepSpeed's own config takes them as objects too
SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "activation_checkpointing", "comms_logger")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"not valid JSON ({err})", str(path), "fix the syntax at the place named") from None
    if not isinstance(data, dict):
        raise ConfigError("the top level is not a JSON object", str(path), "write it as {\"key\": value, ...}")
    for key, value in data.items():
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{key!r} is {json.dumps(value)}, not a JSON object", str(path),
                              f'write it as "{key}": {{...}} (see ds_configs/ for examples)')
    for key in OWNED_BY_RUN_CONFIG:
        if key in data:
            raise ConfigError(f"sets {key!r}, which is derived from the run config", str(path),
                              f"remove {key!r}; set train.micro_batch, train.grad_accum or train.grad_clip instead")
    return data


def build_ds_config(cfg: Config, world_size: int, device_type: str) -> dict[str, Any]:
    """Merged JSON + the derived batch arithmetic:
    train_batch_size = micro_batch * grad_accum * world_size (samples backpropagated per optimizer step).

    The optimizer is torch's AdamW (`torch_adam` in base.json), fused on CUDA: DeepSpeed's own FusedAdam
    is JIT-compiled with nvcc at deepspeed.initialize, which a machine without the CUDA toolkit cannot do.
    ds_configs/offload_optimizer.json turns torch_adam off for DeepSpeed's CPU Adam (compiled with gcc)."""
    merged: dict[str, Any] = {}
    for path in cfg.train.ds_configs:
        merged = deep_merge(merged, read_json(resolve_path(path)))
    t = cfg.train
    merged["train_micro_batch_size_per_gpu"] = t.micro_batch
    merged["gradient_accumulation_steps"] = t.grad_accum
    merged["train_batch_size"] = t.micro_batch * t.grad_accum * world_size
    merged["gradient_clipping"] = t.grad_clip
    optimizer = merged.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {}).update({"lr": t.lr, "weight_decay": t.weight_decay})
    params = optimizer["params"]
    if device_type == "cuda" and params.get("torch_adam") and not _offloaded(merged):
        params.setdefault("fused", True)  # one kernel for all parameters (foreach on CPU: the tested numerics)
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0-3, got {stage!r}", "train.ds_configs",
                          "use ds_configs/zero1.json, zero2.json or zero3.json")
    if stage == 0 and merged.get("bf16", {}).get("enabled"):
        log.warning("bf16 at ZeRO stage 0 trains the bf16 weights themselves, without fp32 master weights: "
                    "add ds_configs/zero1.json or zero2.json for mixed precision (docs/GPU.md)")
    return merged


def _offloaded(ds: dict[str, Any]) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
