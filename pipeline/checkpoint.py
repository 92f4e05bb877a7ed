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

from pipeline.errors import ConfigError, DataError
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
         info: DistInfo, keep: int, run_record: dict[str, Any]) -> Path:
    """Every rank's part of the checkpoint of `step`; `run_record` (the resolved config and the data's
    identity, pipeline/run_identity.py) is what a resume is checked against."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"rank{info.rank:05d}_state.pt")
    if info.is_main:
        _atomic_write(ckpt_dir / tag / "run.json", json.dumps(run_record, indent=1))
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


class DamagedCheckpoint(Exception):
    """A checkpoint file that does not open (truncated, overwritten): skipped for the one before it."""


def vet_files(tag_dir: Path) -> None:
    """Open every .pt file of a checkpoint with torch.load(weights_only=True) before DeepSpeed loads it.

    DeepSpeed 0.19.8 reads its files with weights_only=False (any pickled object, so any code, would
    run); a file that holds more than tensors, plain containers and the few DeepSpeed classes above is
    refused here instead (ConfigError, exit 2). A file that does not open at all is damaged
    (DamagedCheckpoint). mmap keeps this cheap: tensor data is mapped, not read."""
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as err:  # the unpickler raises UnpicklingError, RuntimeError, EOFError, ...
            found = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand \S+", str(err))
            if found:
                raise ConfigError(f"refusing to load this checkpoint: it holds more than plain weights "
                                  f"(torch.load with weights_only=True: {found.group(0)})", str(path),
                                  "resume only checkpoints you trust, or start a new run (train.out_dir)") from None
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DamagedCheckpoint(f"{path} does not open ({type(err).__name__}: {reason})") from None


def resumable_tag(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint whose files all open, and the newer ones skipped as damaged."""
    damaged = []
    for tag in reversed(complete_tags(ckpt_dir)):
        try:
            vet_files(ckpt_dir / tag)
            return tag, damaged
        except DamagedCheckpoint as err:
            damaged.append(str(err))
    return None, damaged


def load_latest(engine: Any, ckpt_dir: Path, info: DistInfo) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(client_state, this rank's state) from the newest complete checkpoint that opens, or None.

    A newer one that is damaged is renamed `damaged-<tag>` (kept for a look, never resumed, never
    overwritten by a later save), with a warning that names its bad file."""
    clean_incomplete(ckpt_dir, info)
    tag, damaged = resumable_tag(ckpt_dir)
    for reason in damaged:
        log.warning("skipping a damaged checkpoint: %s", reason)
    barrier(info)  # every rank has chosen before rank 0 renames
    if info.is_main:
        for name in complete_tags(ckpt_dir):
            if tag is None or name > tag:
                (ckpt_dir / name).rename(ckpt_dir / f"damaged-{name}")
    barrier(info)
    if tag is None:
        if damaged:
            raise DataError(f"every complete checkpoint is damaged ({damaged[0]})", str(ckpt_dir),
                            "start over in a new train.out_dir, or with train.resume=false")
        return None
    if damaged:
        log.warning("resuming from %s instead", ckpt_dir / tag)
    marker = json.loads((ckpt_dir / tag / MARKER).read_text())
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise DataError("DeepSpeed could not load this checkpoint", str(ckpt_dir / tag),
                        "start over in a new train.out_dir, or with train.resume=false")
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
    raise ConfigError(f"no complete checkpoint in {path} (a step dir with a {MARKER} marker, or a run dir "
                      "holding checkpoints/)", "train.init_from", "point it at a finished run's directory")


def load_module_weights(model: torch.nn.Module, path: str) -> Path:
    """Warm start: module weights only (no optimizer, progress, RNG or MLflow run) from a ZeRO-0..2
    checkpoint. The architecture must match exactly."""
    step_dir = init_checkpoint_dir(path)
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(f"{step_dir} has no mp_rank_*_model_states.pt: not a DeepSpeed checkpoint", "train.init_from",
                          "point it at a run directory written by pipeline.train")
    try:
        vet_files(step_dir)
    except DamagedCheckpoint as err:
        raise ConfigError(f"the warm-start checkpoint is damaged: {err}", "train.init_from",
                          "point it at another complete checkpoint") from None
    state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"the weights in {files[0]} do not fit this model: {str(err).splitlines()[0]}",
                          "train.init_from",
                          "warm-start from a run with the same model.* keys and data vocab/seq_len, saved at ZeRO 0-2 "
                          "(ZeRO-3 checkpoints are partitioned)") from None
    log.info("warm start: module weights from %s", step_dir)
    return step_dir
