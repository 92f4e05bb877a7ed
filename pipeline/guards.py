"""Guards that stop a run going wrong quietly: a non-finite loss is skipped, then stops the run."""
from __future__ import annotations

import logging

import torch

from pipeline.distributed import DistInfo, all_reduce_max
from pipeline.progress import Progress

log = logging.getLogger(__name__)


class NonFiniteStop(FloatingPointError):
    """Too many non-finite losses in a row: the run stops; the newest complete checkpoint is intact."""


def check_finite(loss: torch.Tensor, info: DistInfo, progress: Progress, max_in_a_row: int) -> bool:
    """False when any rank's loss is NaN/inf: all ranks then skip the micro-step together."""
    bad = all_reduce_max([float(not torch.isfinite(loss.detach()).item())], info)[0] > 0
    if not bad:
        progress.nonfinite_in_a_row = 0
        return True
    progress.nonfinite_skipped += 1
    progress.nonfinite_in_a_row += 1
    log.warning("non-finite loss at step %d: micro-step skipped (%d in a row, %d in total)",
                progress.step, progress.nonfinite_in_a_row, progress.nonfinite_skipped)
    if progress.nonfinite_in_a_row >= max_in_a_row:
        raise NonFiniteStop(
            f"{progress.nonfinite_in_a_row} non-finite losses in a row at step {progress.step} "
            f"(train.max_nonfinite_in_a_row={max_in_a_row}): stopping; the last complete checkpoint is intact. "
            "Try a lower train.lr, a longer warmup, or fp32/bf16 instead of fp16.")
    return False
