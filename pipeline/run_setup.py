"""Everything the training loop needs, built and checked once: data, model, engine, selector,
checkpoints, tracking. Keeps pipeline/train.py a loop that reads top to bottom."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, preflight
from pipeline.config import Config, ConfigError, TrainConfig, candidates_per_micro_step, flatten, to_dict
from pipeline.data import DataFaults, MaskSpec, eval_batches, mask_spec, micro_steps_per_epoch, train_loader
from pipeline.distributed import DistInfo, all_reduce_max, all_reduce_sum
from pipeline.ds_config import REPO_ROOT, build_ds_config, zero_stage
from pipeline.evaluate import evaluate
from pipeline.export import export_hf
from pipeline.manifest import DataError, Manifest
from pipeline.model import build_model, num_parameters
from pipeline.selector import Selector
from pipeline.tracking import Tracker, saved_run_id, start_tracker

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters saved in every checkpoint; together with the RNG states they make resumption exact."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # candidate micro-batches consumed in this epoch (this rank)
    samples_seen: int = 0  # candidates drawn, all ranks
    samples_backprop: int = 0  # samples backpropagated, all ranks
    train_time_s: float = 0.0
    wall_clock_s: float = 0.0
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    skipped_corrupt: int = 0  # corrupt samples skipped, all ranks (as of the last checkpoint)
    last_eval_train_s: float = 0.0  # training time at the last eval (for train.eval_every_s)
    mlflow_run_id: str = ""


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr * min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cosine)


def check_finite(loss: torch.Tensor, info: DistInfo, progress: Progress, max_in_a_row: int) -> bool:
    """False when any rank's loss is NaN/inf: all ranks then skip the micro-step together."""
    bad = all_reduce_max(float(not torch.isfinite(loss.detach()).item()), info) > 0
    if not bad:
        progress.nonfinite_in_a_row = 0
        return True
    progress.nonfinite_skipped += 1
    progress.nonfinite_in_a_row += 1
    log.warning("non-finite loss at step %d: micro-step skipped (%d in a row, %d in total)",
                progress.step, progress.nonfinite_in_a_row, progress.nonfinite_skipped)
    if progress.nonfinite_in_a_row >= max_in_a_row:
        raise FloatingPointError(
            f"{progress.nonfinite_in_a_row} non-finite losses in a row at step {progress.step} "
            f"(train.max_nonfinite_in_a_row={max_in_a_row}): stopping; the last complete checkpoint is intact. "
            "Try a lower train.lr, a longer warmup, or fp32/bf16 instead of fp16.")
    return False


def run_name(cfg: Config) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    s = cfg.select
    policy = f"sift@{s.exit_layer}" if s.policy == "sift" else s.policy
    return f"{policy}-{cfg.model.preset}-s{cfg.train.seed}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A probe file of its own per process: every rank checks the same out_dir at the same time.
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test-"):
            pass
    except OSError as err:
        raise ConfigError(f"train.out_dir {path}: not writable ({err.strerror})") from err
    return path


@dataclass
class RunParts:
    cfg: Config
    info: DistInfo
    manifest: Manifest
    engine: Any
    selector: Selector
    progress: Progress
    tracker: Tracker
    out_dir: Path
    val: list[dict]
    spec: MaskSpec
    faults: DataFaults = field(default_factory=DataFaults)  # this rank's; saved in its rank state
    batches: Iterator[dict] = field(init=False)

    def __post_init__(self) -> None:
        self.batches = self._candidate_batches()

    def _candidate_batches(self) -> Iterator[dict]:
        """Candidate micro-batches forever, epoch after epoch, from the saved data position."""
        p, cfg, info = self.progress, self.cfg, self.info
        batch = candidates_per_micro_step(cfg)
        while True:
            if micro_steps_per_epoch(self.manifest, p.epoch, cfg.train.seed, info.world_size, batch) == 0:
                raise DataError(f"{self.manifest.path}: too few train samples for one micro-batch of {batch} "
                                f"per rank on {info.world_size} ranks")
            loader, _ = train_loader(self.manifest, self.spec, batch=batch, epoch=p.epoch, seed=cfg.train.seed,
                                     rank=info.rank, world=info.world_size, start=p.micro_in_epoch,
                                     shuffle_buffer=cfg.data.shuffle_buffer, strict=cfg.data.strict,
                                     num_workers=cfg.data.num_workers)
            for candidates in loader:
                p.micro_in_epoch += 1
                yield self.faults.update(candidates)
            p.epoch, p.micro_in_epoch = p.epoch + 1, 0
            self.faults.end_epoch()
            log.info("epoch %d done", p.epoch)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.engine, self.val, self.info, self.manifest.vocab_size, self.spec.mask_id)

    def save_checkpoint(self) -> None:
        counts = all_reduce_sum(torch.tensor([self.faults.skipped, self.faults.repeated], dtype=torch.float64,
                                             device=self.info.device), self.info)
        self.progress.skipped_corrupt = int(counts[0].item())
        # MLflow may have come up only after the start: the run id a restart must resume
        self.progress.mlflow_run_id = self.tracker.run_id or self.progress.mlflow_run_id
        client_state = {"progress": asdict(self.progress)}
        rank_state = {"torch_rng": torch.get_rng_state(), "selector": self.selector.state_dict(),
                      "data_faults": asdict(self.faults)}
        checkpoint.save(self.engine, self.out_dir / "checkpoints", self.progress.step, client_state, rank_state,
                        self.info, self.cfg.train.keep_checkpoints)
        self.tracker.log_metrics({"data/skipped_corrupt": counts[0].item(), "data/repeated_samples": counts[1].item()},
                                 self.progress.step)

    def record_keys(self, step: int, candidates: list[str], kept: list[str], loss: float) -> None:
        if self.cfg.train.record_keys:
            path = self.out_dir / "keys" / f"rank{self.info.rank:05d}.jsonl"
            path.parent.mkdir(exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps({"step": step, "epoch": self.progress.epoch, "candidates": candidates,
                                         "kept": kept, "loss": loss}) + "\n")

    def finish(self) -> None:
        if self.cfg.train.export:
            export_dir = export_hf(self.engine, self.manifest.tokenizer_dir(), self.out_dir / "export", self.info)
            self.tracker.set_tags({"export_dir": str(export_dir)})
        self.tracker.close()


def build_run(cfg: Config, info: DistInfo) -> RunParts:
    import deepspeed

    manifest = Manifest.load(cfg.data.dir)
    preflight.check_run(cfg, info.world_size, manifest)  # every input checked before the heavy work
    out_dir = _writable_dir(Path(cfg.train.out_dir))
    ds_config = build_ds_config(cfg, info.world_size)
    torch.manual_seed(cfg.train.seed * 1000 + info.rank)
    model = build_model(cfg.model, manifest.vocab_size, manifest.seq_len, manifest.special_ids["pad"])
    num_layers = model.num_layers
    if cfg.train.init_from:
        load_module_weights(model, cfg.train.init_from)  # a resumable checkpoint in out_dir still wins
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    selector = Selector(cfg.select, micro_batch=cfg.train.micro_batch, num_layers=num_layers,
                        vocab_size=manifest.vocab_size, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                        rank=info.rank, mask_id=manifest.special_ids["mask"])
    progress, faults = Progress(), DataFaults()
    resumed = checkpoint.load_latest(engine, out_dir / "checkpoints", info) if cfg.train.resume else None
    if resumed:
        client_state, rank_state = resumed
        progress = Progress(**client_state["progress"])
        torch.set_rng_state(rank_state["torch_rng"])
        selector.load_state_dict(rank_state["selector"])
        faults = DataFaults(**rank_state.get("data_faults", {}))
    # a run started while MLflow was down has its id only in the journal's mlflow_run.json
    resume_id = (progress.mlflow_run_id or saved_run_id(out_dir)) if resumed else None
    tracker = start_tracker(cfg.tracking, str(out_dir), rank=info.rank, run_name=run_name(cfg),
                            resume_run_id=resume_id or None)
    progress.mlflow_run_id = tracker.run_id or progress.mlflow_run_id
    if not resumed:
        _log_run_start(cfg, info, manifest, ds_config, tracker, out_dir, num_parameters(engine.module))
    spec = mask_spec(cfg.data, manifest)
    val = eval_batches(manifest, spec, samples=cfg.data.eval_samples, batch=cfg.train.micro_batch,
                       rank=info.rank, world=info.world_size)
    log.info("model %s: %.2fM parameters, ZeRO stage %d, %d ranks", cfg.model.preset,
             num_parameters(engine.module) / 1e6, zero_stage(ds_config), info.world_size)
    return RunParts(cfg, info, manifest, engine, selector, progress, tracker, out_dir, val, spec, faults)


def init_checkpoint_dir(path: str) -> Path:
    """train.init_from -> a complete checkpoint step dir: the dir itself, or the newest complete one
    in `path/checkpoints` or `path`."""
    root = Path(path)
    if (root / checkpoint.MARKER).is_file():
        return root
    for ckpt_dir in (root / "checkpoints", root):
        tags = checkpoint.complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
        if tags:
            return ckpt_dir / tags[-1]
    raise ConfigError(f"train.init_from {path}: no complete checkpoint there (expected a step dir with a "
                      f"{checkpoint.MARKER} marker, or a run dir holding checkpoints/)")


def load_module_weights(model: torch.nn.Module, path: str) -> Path:
    """Warm start: module weights only (no optimizer, progress, RNG or MLflow run) from a ZeRO-0..2
    checkpoint. The architecture must match exactly."""
    step_dir = init_checkpoint_dir(path)
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(f"train.init_from {step_dir}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    checkpoint.vet_files(step_dir)
    state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"train.init_from {files[0]}: weights do not fit this model (same preset, "
                          f"model.pre_layernorm and data vocab/seq_len needed; ZeRO-3 checkpoints are "
                          f"partitioned): {str(err).splitlines()[0]}") from err
    log.info("warm start: module weights from %s", step_dir)
    return step_dir


def _log_run_start(cfg: Config, info: DistInfo, manifest: Manifest, ds_config: dict, tracker: Tracker,
                   out_dir: Path, parameters: int) -> None:
    resolved = to_dict(cfg)
    if info.is_main:
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    tracker.log_params({**flatten(resolved), "derived.world_size": info.world_size,
                        "derived.train_batch_size": ds_config["train_batch_size"],
                        "derived.candidates_per_micro_step": candidates_per_micro_step(cfg),
                        "derived.parameters": parameters, "data.seq_len": manifest.seq_len,
                        "data.vocab_size": manifest.vocab_size})
    tracker.set_tags({"policy": cfg.select.policy, "exit_layer": str(cfg.select.exit_layer),
                      "preset": cfg.model.preset, "seed": str(cfg.train.seed), "git_commit": git_commit(),
                      "sift.kind": "train", "world_size": str(info.world_size)})
    tracker.log_dict(resolved, "config.json")
    tracker.log_dict(ds_config, "ds_config.json")
    if os.path.isfile(manifest.path):
        tracker.log_artifact(manifest.path)
