"""The learning-rate schedule: a pure function of where training is."""
from __future__ import annotations

import math

from pipeline.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr * min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cosine)
