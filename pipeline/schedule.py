"""Where a run is in its budget, and the learning rate there: pure functions, unit-tested.

Two budgets (train.schedule): `steps` spreads warmup and decay over train.max_steps; `time` over
train.max_seconds of training time, so a run stopped by its time budget has decayed fully instead of
stopping early in a 100,000-step schedule (academic-budget-bert schedules by time). `auto` is `time`
whenever train.max_seconds is set. The elapsed training time is saved in every checkpoint and agreed
across ranks each step, so a resumed run and every rank see the same schedule.
"""
from __future__ import annotations

import math

from pipeline.config import TrainConfig


def uses_time(t: TrainConfig) -> bool:
    return t.schedule == "time" or (t.schedule == "auto" and t.max_seconds > 0)


def budget_fraction(step: int, elapsed_s: float, t: TrainConfig) -> float:
    """How far through its budget a run is, in [0, 1]: training time over max_seconds on the time
    schedule, steps over max_steps otherwise. Selection schedules (select.active_from) read it too."""
    fraction = elapsed_s / t.max_seconds if uses_time(t) else step / max(t.max_steps, 1)
    return min(max(fraction, 0.0), 1.0)


def decay(progress: float, shape: str) -> float:
    """1 -> 0 as progress goes 0 -> 1: cosine or linear."""
    progress = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress


def lr_at(step: int, elapsed_s: float, t: TrainConfig) -> float:
    """The learning rate of the step about to run.

    steps: linear warmup over warmup_steps to train.lr, then decay to lr * min_lr_ratio at max_steps.
    time: linear warmup over the first warmup_fraction of max_seconds, then decay to lr * min_lr_ratio
    when the budget ends."""
    if uses_time(t):
        fraction = elapsed_s / t.max_seconds
        if fraction < t.warmup_fraction:
            return t.lr * fraction / t.warmup_fraction
        progress = (fraction - t.warmup_fraction) / max(1e-12, 1.0 - t.warmup_fraction)
    else:
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay(progress, t.lr_decay))
