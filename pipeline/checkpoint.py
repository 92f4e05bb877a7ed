"""Checkpoints that are complete or ignored.

DeepSpeed writes model, optimizer and client state under <out>/checkpoints/<tag>/; each rank adds
its own RNG and selector state; only when every rank is done does rank 0 write the tag's COMPLETE
marker (write then rename). Resuming takes the newest tag with a marker, so a checkpoint cut short
by a crash is never the one resumed from (and is deleted on the next start).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.distributed import DistInfo, barrier

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG.match(p.name) and (p / MARKER).is_file())


def clean_incomplete(ckpt_dir: Path, info: DistInfo) -> None:
    """Rank 0 deletes tag directories without a marker (left by a crash during a save)."""
    if info.is_main and ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            if path.is_dir() and TAG.match(path.name) and not (path / MARKER).is_file():
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", path)
                shutil.rmtree(path)
    barrier(info)


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         info: DistInfo, keep: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"rank{info.rank:05d}_state.pt")
    barrier(info)  # every rank's files are on disk before the marker
    if info.is_main:
        _atomic_write(ckpt_dir / tag / MARKER, json.dumps({"step": step, "world_size": info.world_size}))
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier(info)
    return ckpt_dir / tag


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoint files (ZeRO optimizer state)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def vet_files(tag_dir: Path) -> None:
    """Open every .pt file of a checkpoint with torch.load(weights_only=True) before DeepSpeed loads it.

    DeepSpeed 0.19.8 reads its files with weights_only=False (any pickled object, so any code, would
    run); a file that holds more than tensors, plain containers and the few DeepSpeed classes above is
    refused here instead. mmap keeps this cheap: tensor data is mapped, not read."""
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as err:  # the unpickler raises UnpicklingError, RuntimeError, ...
            found = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand \S+", str(err))
            reason = found.group(0) if found else (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RuntimeError(f"{path}: refusing to load this checkpoint: it holds more than plain weights "
                               f"(torch.load with weights_only=True: {reason}); resume only checkpoints you "
                               "trust") from err


def load_latest(engine: Any, ckpt_dir: Path, info: DistInfo) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(client_state, this rank's state) from the newest complete checkpoint, or None."""
    clean_incomplete(ckpt_dir, info)
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    tag = tags[-1]
    marker = json.loads((ckpt_dir / tag / MARKER).read_text())
    if marker.get("world_size") != info.world_size:
        raise RuntimeError(f"{ckpt_dir / tag}: saved with {marker.get('world_size')} ranks, resuming with "
                           f"{info.world_size}: exact resumption needs the same number of ranks")
    vet_files(ckpt_dir / tag)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rank_state = torch.load(ckpt_dir / tag / f"rank{info.rank:05d}_state.pt", weights_only=True)
    log.info("resumed from %s (step %d)", ckpt_dir / tag, marker["step"])
    return client_state, rank_state


def init_checkpoint_dir(path: str) -> Path:
    """train.init_from -> a complete checkpoint step dir: the dir itself, or the newest complete one
    in `path/checkpoints` or `path`."""
    root = Path(path)
    if (root / MARKER).is_file():
        return root
    for ckpt_dir in (root / "checkpoints", root):
        tags = complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
        if tags:
            return ckpt_dir / tags[-1]
    raise ConfigError(f"train.init_from {path}: no complete checkpoint there (expected a step dir with a "
                      f"{MARKER} marker, or a run dir holding checkpoints/)")


def load_module_weights(model: torch.nn.Module, path: str) -> Path:
    """Warm start: module weights only (no optimizer, progress, RNG or MLflow run) from a ZeRO-0..2
    checkpoint. The architecture must match exactly."""
    step_dir = init_checkpoint_dir(path)
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(f"train.init_from {step_dir}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    vet_files(step_dir)
    state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"train.init_from {files[0]}: weights do not fit this model (same preset, "
                          f"model.pre_layernorm and data vocab/seq_len needed; ZeRO-3 checkpoints are "
                          f"partitioned): {str(err).splitlines()[0]}") from err
    log.info("warm start: module weights from %s", step_dir)
    return step_dir
