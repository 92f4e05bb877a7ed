"""Where a run is: the counters every checkpoint saves, the progress bar, the end-of-run summary."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm


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
    last_accuracy: float = 0.0  # eval/accuracy and eval/mask_accuracy at the last eval (targets are checked on them)
    last_mask_accuracy: float = 0.0
    mask_accuracy_ref: float = 0.0  # the context-free reference of the eval set (pipeline/reference.py)
    mlflow_run_id: str = ""


class ProgressBar:
    """A bar on rank 0 that follows whichever budget ends the run first, train.max_steps or
    train.max_seconds of training time, so its ETA is the run's (a line a minute in batch logs)."""

    SCALE = 1000

    def __init__(self, progress: Progress, max_steps: int, max_seconds: float, enabled: bool) -> None:
        self.max_steps, self.max_seconds = max_steps, max_seconds
        self.bar = tqdm(total=self.SCALE, initial=self._permille(progress), disable=not enabled, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]",
                        mininterval=0.1 if sys.stderr.isatty() else 60.0)

    def fraction(self, p: Progress) -> float:
        """How far the run is: the larger of its step and time fractions."""
        time_part = p.train_time_s / self.max_seconds if self.max_seconds > 0 else 0.0
        return min(1.0, max(p.step / self.max_steps, time_part))

    def _permille(self, p: Progress) -> int:
        return int(self.SCALE * self.fraction(p))

    def update(self, p: Progress, loss: float | None = None, lr: float | None = None) -> None:
        parts = [f"step {p.step}/{self.max_steps}"]
        if self.max_seconds > 0:
            parts.append(f"{p.train_time_s:.0f}/{self.max_seconds:g} s")
        if loss is not None:
            parts.append(f"loss {loss:.3f} lr {lr:.2e}")
        self.bar.set_postfix_str(" · ".join(parts), refresh=False)
        self.bar.update(self._permille(p) - self.bar.n)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
