"""Where a run is: the counters every checkpoint saves, and the progress bar that shows them."""
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
    mlflow_run_id: str = ""


def progress_bar(progress: Progress, max_steps: int, enabled: bool) -> tqdm:
    """A step bar on rank 0; a line a minute when stderr is not a terminal (Slurm logs)."""
    return tqdm(total=max_steps, initial=progress.step, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 60.0)
