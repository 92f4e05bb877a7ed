"""A training run and everything it owns, built once from the config: data, engine, selector,
checkpoints, tracking and progress. pipeline/train.py is the loop over its steps.

    with Run.open(cfg, info) as run:      # every input checked, engine built, newest checkpoint resumed
        ... train_step(run.engine, run.selector, run.batches, run.progress, ...) ...
        run.evaluate(); run.save()
        run.finish()                      # export, then the MLflow run FINISHED
An exception inside the block closes the MLflow run as FAILED (KILLED for Ctrl-C); the journal
keeps every metric.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, preflight
from pipeline.config import Config, ConfigError, candidates_per_micro_step, exit_layer_run, flatten
from pipeline.data import DataFaults, eval_batches, train_loader
from pipeline.distributed import DistInfo, all_reduce_sum, device_name
from pipeline.ds_config import REPO_ROOT, build_ds_config, zero_stage
from pipeline.evaluate import evaluate
from pipeline.export import export_hf
from pipeline.flops import resolve_peak, step_work
from pipeline.guards import check_state_finite
from pipeline.manifest import Manifest
from pipeline.masking import eval_mask_spec, mask_spec
from pipeline.model import attention_backend, build_model, num_parameters
from pipeline.progress import Progress
from pipeline.reference import context_free_reference, train_unigram_counts
from pipeline.run_identity import public_config, run_record
from pipeline.sift.hook import Selector
from pipeline.step import StepMetrics, window_metrics
from pipeline.summary import summary
from pipeline.tracking import NullTracker, Tracker, resolve_uri, saved_run_id, start_tracker
from pipeline.tracking.scrub import redact_url

log = logging.getLogger(__name__)


class Run:
    def __init__(self, cfg: Config, info: DistInfo, manifest: Manifest, engine: Any, selector: Selector,
                 out_dir: Path) -> None:
        self.cfg, self.info, self.manifest, self.engine, self.selector = cfg, info, manifest, engine, selector
        self.out_dir = out_dir
        self.progress, self.faults = Progress(), DataFaults()  # this rank's faults; saved in its rank state
        self.tracker: Tracker = NullTracker()
        self.reference: dict[str, float] = {}  # the context-free reference (pipeline/reference.py); on a new run
        self.spec = mask_spec(cfg.data, manifest)
        self.val = eval_batches(manifest, eval_mask_spec(cfg.data, manifest), samples=cfg.data.eval_samples,
                                batch=cfg.train.micro_batch,
                                rank=info.rank, world=info.world_size, verify=cfg.data.verify)
        self.batches: Iterator[dict] = self._candidate_batches()
        # what a step does, for the throughput metrics: FLOPs from the config, the peak from the GPU's name
        self.work = step_work(cfg, info.world_size, manifest.vocab_size, manifest.seq_len,
                              resolve_peak(cfg.train.peak_tflops, device_name(info.device)))
        self._started = time.perf_counter()
        self._closed = False

    @classmethod
    def open(cls, cfg: Config, info: DistInfo) -> "Run":
        """Check every input, build the engine, resume the newest complete checkpoint, start tracking."""
        import deepspeed

        cfg.train.out_dir = cfg.train.out_dir or new_run_dir(cfg, info)
        manifest = Manifest.load(cfg.data.dir)
        changes = preflight.check_run(cfg, info.world_size, manifest)  # every input checked before the heavy work
        out_dir = _writable_dir(Path(cfg.train.out_dir))
        ds_config = build_ds_config(cfg, info.world_size, info.device.type)
        torch.manual_seed(cfg.train.seed * 1000 + info.rank)
        model = build_model(cfg.model, manifest.vocab_size, manifest.seq_len, manifest.special_ids)
        if cfg.train.init_from:
            checkpoint.load_module_weights(model, cfg.train.init_from)  # a resumable checkpoint in out_dir still wins
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        if cfg.train.compile:  # the forward and backward of training; exit-layer scoring calls the blocks eagerly
            engine.compile()
        selector = Selector.for_run(cfg, vocab_size=manifest.vocab_size, mask_id=manifest.special_ids["mask"],
                                    rank=info.rank)
        run = cls(cfg, info, manifest, engine, selector, out_dir)
        resumed = run.resume()
        # a run started while MLflow was down has its id only in the journal's mlflow_run.json
        resume_id = (run.progress.mlflow_run_id or saved_run_id(out_dir)) if resumed else None
        run.tracker = start_tracker(cfg.tracking, str(out_dir), rank=info.rank, run_name=run_name(cfg),
                                    resume_run_id=resume_id or None)
        run.progress.mlflow_run_id = run.tracker.run_id or run.progress.mlflow_run_id
        if resumed and changes:  # safe keys a resume changed (pipeline/run_identity.py): recorded, not refused
            log.warning("resuming at step %d with changed settings: %s", run.progress.step, "; ".join(changes))
            run.tracker.set_tags({f"resume.step{run.progress.step}.changes": "; ".join(changes)[:5000]})
        if not resumed:
            run._log_start(ds_config)
            run.reference = context_free_reference(train_unigram_counts(manifest), run.val, run.spec.mask_id, info)
            run.progress.mask_accuracy_ref = run.reference["eval/mask_accuracy_ref"]
            run.tracker.log_metrics(run.reference, run.progress.step)
            log.info("context-free reference at the eval [MASK] positions: accuracy %.4f (the most frequent "
                     "token), unigram cross-entropy %.3f", run.reference["eval/mask_accuracy_ref"],
                     run.reference["eval/unigram_ce"])
        log.info("run directory %s (the same command with --resume %s continues it)", out_dir, out_dir)
        log.info("model %s %s: %.2fM parameters, attention %s, ZeRO stage %d, %d ranks on %s", cfg.model.arch,
                 cfg.model.preset, num_parameters(engine.module) / 1e6, attention_backend(engine.module),
                 zero_stage(ds_config), info.world_size, info.device.type)
        log.info("%.3g GFLOP per backpropagated sample, %.3g per scored candidate (pipeline/flops.py); peak %s",
                 run.work.train_flops_per_sample / 1e9, run.work.scoring_flops_per_sample / 1e9,
                 f"{run.work.peak_tflops:g} TFLOP/s per rank" if run.work.peak_tflops else "unknown: no MFU")
        return run

    def resume(self) -> bool:
        """Load the newest complete checkpoint in out_dir (train.resume); False when there is none."""
        loaded = checkpoint.load_latest(self.engine, self.out_dir / "checkpoints", self.info) \
            if self.cfg.train.resume else None
        if loaded is None:
            return False
        client_state, rank_state = loaded
        self.progress = Progress(**client_state["progress"])
        torch.set_rng_state(rank_state["torch_rng"])
        if "cuda_rng" in rank_state:  # dropout masks on the GPU come from this rank's device generator
            torch.cuda.set_rng_state(rank_state["cuda_rng"], self.info.device)
        self.selector.load_state_dict(rank_state["selector"])
        self.faults = DataFaults(**rank_state.get("data_faults", {}))
        self._started = time.perf_counter() - self.progress.wall_clock_s
        return True

    @property
    def capacity_prob(self) -> float | None:
        """train.static_shapes: the share of tokens the MLM head makes room for (data.mask_prob), or None
        for the exact, data-dependent head (pipeline.masking.masked_positions)."""
        static = self.cfg.train.static_shapes
        on = static == "true" or (static == "auto" and self.info.device.type == "cuda")
        return self.cfg.data.mask_prob if on else None

    def complete(self) -> str:
        """Why this run has nothing left to train ("" if it has): its step or time budget is spent."""
        p, t = self.progress, self.cfg.train
        if p.step >= t.max_steps:
            return f"step {p.step} of train.max_steps={t.max_steps}"
        if 0 < t.max_seconds <= p.train_time_s:
            return f"{p.train_time_s:.0f} s of training of train.max_seconds={t.max_seconds:g}"
        if self.target_reached():
            return f"its target was reached (eval/accuracy {p.last_accuracy:.4f}, eval/mask_accuracy " \
                   f"{p.last_mask_accuracy:.4f})"
        return ""

    def target_reached(self) -> bool:
        """train.target_accuracy / train.target_mask_accuracy, on the last eval."""
        p, t = self.progress, self.cfg.train
        return 0 < t.target_accuracy <= p.last_accuracy or 0 < t.target_mask_accuracy <= p.last_mask_accuracy

    def clock(self) -> float:
        """Wall-clock seconds of this run, across resumes."""
        return time.perf_counter() - self._started

    def _candidate_batches(self) -> Iterator[dict]:
        """Candidate micro-batches forever from the saved data position, out of one DataLoader whose
        workers go on from epoch to epoch; the progress counters follow the batches' positions."""
        cfg, info = self.cfg, self.info
        p = self.progress  # read at the first batch: resume() replaces it before
        loader, _ = train_loader(self.manifest, self.spec, batch=candidates_per_micro_step(cfg), epoch=p.epoch,
                                 seed=cfg.train.seed, rank=info.rank, world=info.world_size, start=p.micro_in_epoch,
                                 shuffle_buffer=cfg.data.shuffle_buffer, strict=cfg.data.strict,
                                 num_workers=cfg.data.num_workers, verify=cfg.data.verify, epochs=None,
                                 device_type=info.device.type)
        for candidates in loader:
            epoch, micro = candidates.pop("position")
            if epoch != p.epoch:
                p.epoch = epoch
                self.faults.end_epoch()
                log.info("epoch %d done", epoch)
            p.micro_in_epoch = micro + 1
            yield self.faults.update(candidates)

    def log_window(self, window: list[StepMetrics]) -> None:
        self.tracker.log_metrics(window_metrics(window, self.progress, self.work), self.progress.step)

    def evaluate(self) -> dict[str, float]:
        """Eval metrics, logged with the progress counters at this point (curves need no join)."""
        p = self.progress
        p.last_eval_train_s = p.train_time_s
        metrics = evaluate(self.engine, self.val, self.info, self.manifest.vocab_size, self.spec.mask_id)
        p.last_accuracy, p.last_mask_accuracy = metrics["eval/accuracy"], metrics["eval/mask_accuracy"]
        self.tracker.log_metrics({**metrics, "eval/train_time_s": p.train_time_s,
                                  "eval/samples_backpropagated": p.samples_backprop,
                                  "eval/samples_seen": p.samples_seen, "eval/wall_clock_s": self.clock()}, p.step)
        log.info("step %d: eval loss %.4f accuracy %.4f (at [MASK]: %.4f)", p.step, metrics["eval/loss"],
                 metrics["eval/accuracy"], metrics["eval/mask_accuracy"])
        return metrics

    def start_selection_if_due(self, eval_metrics: dict[str, float]) -> None:
        """select.start_at_mask_accuracy: the first eval at or above it starts selection (all ranks
        see the same all-reduced eval, so they start at the same step); recorded as a tag."""
        threshold = self.cfg.select.start_at_mask_accuracy
        if self.selector.waiting and eval_metrics["eval/mask_accuracy"] >= threshold:
            self.selector.start(self.progress.step)
            self.tracker.set_tags({"select.started_at_step": str(self.progress.step)})
            log.info("eval [MASK] accuracy %.4f >= %.4f (select.start_at_mask_accuracy): selection on from step %d",
                     eval_metrics["eval/mask_accuracy"], threshold, self.progress.step)

    def save(self) -> None:
        """A checkpoint of the whole run state at this step (every rank takes part); never of a
        non-finite state (pipeline/guards.py)."""
        check_state_finite(self.engine, self.info, self.progress.step)
        counts = all_reduce_sum(torch.tensor([self.faults.skipped, self.faults.repeated, self.faults.skipped_shards],
                                             dtype=torch.float64, device=self.info.device), self.info)
        p = self.progress
        p.skipped_corrupt, p.wall_clock_s = int(counts[0].item()), self.clock()
        # MLflow may have come up only after the start: the run id a restart must resume
        p.mlflow_run_id = self.tracker.run_id or p.mlflow_run_id
        rank_state = {"torch_rng": torch.get_rng_state(), "selector": self.selector.state_dict(),
                      "data_faults": asdict(self.faults)}
        if self.info.device.type == "cuda":
            rank_state["cuda_rng"] = torch.cuda.get_rng_state(self.info.device)
        checkpoint.save(self.engine, self.out_dir / "checkpoints", p.step, {"progress": asdict(p)}, rank_state,
                        self.info, self.cfg.train.keep_checkpoints, run_record(self.cfg, self.manifest))
        self.tracker.log_metrics({"data/skipped_corrupt": counts[0].item(), "data/repeated_samples": counts[1].item(),
                                  "data/skipped_shards": counts[2].item()}, p.step)

    def record_keys(self, step: int, candidates: list[str], kept: list[str], loss: float) -> None:
        """train.record_keys: each micro-step's candidate and kept sample keys, and its loss."""
        if self.cfg.train.record_keys:
            path = self.out_dir / "keys" / f"rank{self.info.rank:05d}.jsonl"
            path.parent.mkdir(exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps({"step": step, "epoch": self.progress.epoch, "candidates": candidates,
                                         "kept": kept, "loss": loss}) + "\n")

    def finish(self) -> None:
        """The run ended as planned: the Hugging Face export (train.export), then the MLflow run FINISHED."""
        if self.cfg.train.export:
            export_dir = export_hf(self.engine, self.manifest.tokenizer_dir(), self.out_dir / "export", self.info)
            self.tracker.set_tags({"export_dir": str(export_dir)})
        self.close("FINISHED")

    def summary(self, reason: str, last_eval: dict[str, float]) -> str:
        """The end-of-run block (pipeline/summary.py)."""
        tags = checkpoint.complete_tags(self.out_dir / "checkpoints")
        export_dir = self.out_dir / "export"
        return summary(reason, self.progress, last_eval, self.progress.mask_accuracy_ref,
                       str(self.out_dir / "checkpoints" / tags[-1]) if tags else "",
                       str(export_dir) if export_dir.is_dir() else "", self.progress.mlflow_run_id,
                       self.cfg.tracking.experiment, redact_url(resolve_uri(self.cfg.tracking.uri), drop_userinfo=True)
                       if self.cfg.tracking.enabled else "")

    def close(self, status: str) -> None:
        """End the MLflow run with `status` (FINISHED, KILLED, FAILED); idempotent."""
        if not self._closed:
            self._closed = True
            self.tracker.close(status=status)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # the MLflow run shows the crash; the journal keeps every metric
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _log_start(self, ds_config: dict) -> None:
        cfg, info, manifest, tracker = self.cfg, self.info, self.manifest, self.tracker
        resolved = public_config(cfg)  # no credentials in config.json or MLflow
        if info.is_main:
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
            (self.out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        exit_layer = exit_layer_run(cfg)
        tracker.log_params({**flatten(resolved), "derived.world_size": info.world_size,
                            "derived.train_batch_size": ds_config["train_batch_size"],
                            "derived.candidates_per_micro_step": candidates_per_micro_step(cfg),
                            "derived.exit_layer": "-" if exit_layer is None else exit_layer,
                            "derived.parameters": num_parameters(self.engine.module),
                            "derived.peak_tflops": self.work.peak_tflops or "-",
                            "data.seq_len": manifest.seq_len, "data.vocab_size": manifest.vocab_size})
        tracker.set_tags({"policy": cfg.select.policy, "exit_layer": "-" if exit_layer is None else str(exit_layer),
                          "preset": cfg.model.preset, "seed": str(cfg.train.seed), "git_commit": git_commit(),
                          "sift.kind": "train", "world_size": str(info.world_size)})
        tracker.log_dict(resolved, "config.json")
        tracker.log_dict(ds_config, "ds_config.json")
        if os.path.isfile(manifest.path):
            tracker.log_artifact(manifest.path)


def run_name(cfg: Config) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    s = cfg.select
    policy = f"sift@{s.exit_layer}" if s.policy == "sift" else s.policy
    return f"{policy}-{cfg.model.preset}-s{cfg.train.seed}"


def new_run_dir(cfg: Config, info: DistInfo) -> str:
    """A fresh `runs/<run name>-<time>-<4 hex>` for a run given no train.out_dir, the same on every rank
    (rank 0 names it): two runs never share a directory by accident, so never an MLflow run."""
    name = [f"runs/{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"]
    if info.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return name[0]


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
        raise ConfigError(f"{path} is not writable ({err.strerror})", "train.out_dir",
                          "choose a directory you can write to") from None
    return path
