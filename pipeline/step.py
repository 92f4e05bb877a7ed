"""One optimizer step, as training runs it: score candidates -> select -> forward/backward on the
kept -> engine.step, grad_accum times. Used by pipeline/train.py, the benchmarks and the tests.

Per rank and micro-step: the loader's m * oversample candidates go to the engine's device, the
selection hook (pipeline/sift/hook.py) keeps m of them, and only those m run forward, backward and
the optimizer step (DeepSpeed steps the optimizer at the gradient-accumulation boundary).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pipeline.config import TrainConfig
from pipeline.distributed import DistInfo
from pipeline.flops import StepWork, throughput_metrics
from pipeline.guards import check_finite
from pipeline.masking import head_capacity
from pipeline.progress import Progress
from pipeline.schedule import budget_fraction, lr_at
from pipeline.sift.hook import Selector

MicroStepHook = Callable[[int, list[str], list[str], float], None]  # (step, candidate keys, kept keys, loss)


Metric = torch.Tensor | float  # tensors stay on the device until a log window reads them, in one sync


@dataclass
class StepMetrics:
    """What one optimizer step measured; means over its trained micro-steps."""
    loss: Metric
    lr: float
    grad_norm: Metric
    step_s: float  # training time of the step (the probe excluded)
    scoring_s: float
    scoring_cpu_s: float = 0.0
    kept_loss: Metric = math.nan
    dropped_loss: Metric = math.nan
    kept_unigram_ce: Metric = math.nan
    pool_unigram_ce: Metric = math.nan
    probe: dict[str, float] = field(default_factory=dict)
    selecting: float = 0.0  # 1.0 when the policy selected at this step (select/active)

    def as_metrics(self) -> dict[str, Metric]:
        return {"train/loss": self.loss, "train/lr": self.lr, "train/grad_norm": self.grad_norm,
                "select/active": self.selecting,
                "time/step_s": self.step_s, "time/scoring_s": self.scoring_s,
                "select/scoring_share": self.scoring_s / self.step_s, "select/kept_loss": self.kept_loss,
                "select/dropped_loss": self.dropped_loss, "select/kept_unigram_ce": self.kept_unigram_ce,
                "select/pool_unigram_ce": self.pool_unigram_ce, **self.probe}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the engine's device (scoring and training both run there); from pinned
    memory the copy does not block the host."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def train_step(engine, selector: Selector, batches: Iterator[dict], progress: Progress, info: DistInfo,
               t: TrainConfig, *, probe: bool = False, on_micro_step: MicroStepHook | None = None,
               capacity_prob: float | None = None) -> StepMetrics:
    """One optimizer step; updates `progress` (step, samples, training time, non-finite counters).

    One host sync per micro-step outside probe steps: the finite check, which every rank must agree
    on before backward. Losses and statistics stay on the device (StepMetrics). `capacity_prob`: the
    MLM head runs at static shapes, room for that share of the tokens (pipeline.masking.head_capacity);
    None: at exactly the masked positions (a data-dependent shape, a sync on a GPU)."""
    start = time.perf_counter()
    lr = lr_at(progress.step, progress.train_time_s, t)
    fraction = budget_fraction(progress.step, progress.train_time_s, t)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    probe_metrics, probe_s = {}, 0.0
    losses, scoring_s, scoring_cpu_s, kept_loss, dropped_loss, kept_ce, pool_ce = [], 0.0, 0.0, [], [], [], []
    plain_norm = None
    selector.capacity_prob = capacity_prob
    while len(losses) < t.grad_accum:
        batch = to_device(next(batches), info.device)  # (m * oversample, T) candidates
        if probe and not probe_metrics:  # a diagnostic: its time is not training time
            probe_start = time.perf_counter()
            probe_metrics = selector.probe(engine.module, batch)
            probe_s += time.perf_counter() - probe_start
        kept, stats = selector.select(engine.module, batch, progress.step, fraction,
                                      with_keys=on_micro_step is not None)  # (m, T)
        progress.samples_seen += batch["input_ids"].shape[0] * info.world_size
        rows, length = kept["labels"].shape
        capacity = None if capacity_prob is None else head_capacity(rows, length, capacity_prob)
        out = engine(kept["input_ids"], kept["labels"], capacity=capacity)
        if not check_finite(out.loss, info, progress, t.max_nonfinite_in_a_row):
            continue  # every rank skips this micro-step together; counted in progress
        engine.backward(out.loss)
        plain_norm = _plain_grad_norm(engine)  # DeepSpeed reports no norm at ZeRO-0 fp32
        engine.step()
        progress.samples_backprop += rows * info.world_size
        losses.append(out.loss.detach())
        if on_micro_step is not None:  # train.record_keys: a debugging aid, allowed its syncs
            on_micro_step(progress.step, batch["keys"], kept["keys"], losses[-1].item())
        scoring_s, scoring_cpu_s = scoring_s + stats.scoring_s, scoring_cpu_s + stats.scoring_cpu_s
        kept_loss.append(stats.kept_loss), dropped_loss.append(stats.dropped_loss)
        kept_ce.append(stats.kept_unigram_ce), pool_ce.append(stats.pool_unigram_ce)
    progress.step += 1
    step_s = time.perf_counter() - start - probe_s
    progress.train_time_s += step_s
    selecting = float(selector.policy.oversamples and selector.active(progress.step - 1, fraction))
    return StepMetrics(sum(losses) / len(losses), lr, _grad_norm(engine, plain_norm), step_s, scoring_s,
                       scoring_cpu_s, _mean_of(kept_loss), _mean_of(dropped_loss), _mean_of(kept_ce),
                       _mean_of(pool_ce), probe_metrics, selecting)


def window_metrics(window: list[StepMetrics], progress: Progress, work: StepWork) -> dict[str, float]:
    """The metrics of a log window: means of its steps (probe/* is in one step's entry), throughput
    over the window's step time (pipeline/flops.py) and the progress counters."""
    entries = _on_host([step.as_metrics() for step in window])
    keys = dict.fromkeys(key for entry in entries for key in entry)
    metrics = {key: mean([entry[key] for entry in entries if key in entry]) for key in keys}
    metrics.update(throughput_metrics(work, len(window), sum(step.selecting for step in window),
                                      sum(step.step_s for step in window)))
    metrics.update({"progress/samples_seen": progress.samples_seen,
                    "progress/samples_backpropagated": progress.samples_backprop,
                    "progress/train_time_s": progress.train_time_s, "progress/wall_clock_s": progress.wall_clock_s,
                    "train/nonfinite_skipped": progress.nonfinite_skipped})
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _mean_of(values: list[Metric]) -> Metric:
    """The mean of a step's per-micro-step values, on the device when they are tensors."""
    if values and all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.float() for v in values]).nanmean()
    return mean([float(v) for v in values])


def _on_host(entries: list[dict[str, Metric]]) -> list[dict[str, float]]:
    """Every tensor of a log window read back at once: one host sync per window, not one per value."""
    tensors = [(i, key) for i, entry in enumerate(entries) for key, value in entry.items()
               if isinstance(value, torch.Tensor)]
    if tensors:
        device = entries[tensors[0][0]][tensors[0][1]].device
        values = torch.stack([entries[i][key].detach().float().reshape(()).to(device) for i, key in tensors]).tolist()
        entries = [dict(entry) for entry in entries]
        for (i, key), value in zip(tensors, values):
            entries[i][key] = value
    return entries


def _plain_grad_norm(engine) -> torch.Tensor | None:
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    if not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None


def _grad_norm(engine, plain_norm: torch.Tensor | None) -> Metric:
    norm = engine.get_global_grad_norm()
    norm = plain_norm if norm is None else norm
    return norm if norm is not None else math.nan
