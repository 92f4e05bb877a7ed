"""Guards that stop a run going wrong quietly (exit 3, pipeline/cli.py).

- A non-finite loss skips its micro-step on every rank; max_nonfinite_in_a_row of them stop the run.
- Before every checkpoint the weights and the optimizer state are checked: a checkpoint holding a
  NaN or inf is never written, so the newest complete checkpoint is always one worth resuming.
"""
from __future__ import annotations

import logging

import torch

from pipeline.distributed import DistInfo, all_reduce_max
from pipeline.errors import NonFiniteStop
from pipeline.progress import Progress

log = logging.getLogger(__name__)


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
            f"{progress.nonfinite_in_a_row} non-finite losses in a row at step {progress.step}, run stopped "
            "(train.max_nonfinite_in_a_row): the newest complete checkpoint is intact; resume with a lower "
            "train.lr, a longer warmup, or fp32/bf16 instead of fp16")
    return False


def state_tensors(engine) -> list[torch.Tensor]:
    """The tensors a checkpoint saves from this rank: the module's weights (their local partitions
    under ZeRO-3) and the optimizer's parameters (the fp32 masters under mixed precision or ZeRO) and
    state (Adam's moments)."""
    tensors = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed wraps torch's
    if optimizer is not None:
        tensors += [p for group in optimizer.param_groups for p in group["params"]]
        tensors += [v for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return [t for t in tensors if t.numel()]


def check_state_finite(engine, info: DistInfo, step: int) -> None:
    """Raise NonFiniteStop unless every rank's weights and optimizer state are finite (one flag per rank,
    one collective): called before each checkpoint, so no NaN is ever saved as good."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for t in state_tensors(engine)]).all()
    if all_reduce_max([float(not finite.item())], info)[0] > 0:
        raise NonFiniteStop(f"non-finite weights or optimizer state at step {step}, run stopped before its checkpoint "
                            "(train.lr): the newest complete checkpoint is intact; resume with a lower train.lr or "
                            "fp32/bf16 instead of fp16")
