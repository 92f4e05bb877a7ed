"""Process-group set-up for one process, torchrun and the deepspeed launcher, CPU (gloo) or GPU."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_environment() -> None:
    """Call before importing deepspeed: pick the CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise (once per process) and describe this rank. A lone process becomes rank 0 of 1."""
    prepare_environment()
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:  # plain `python -m pipeline.train`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    if on_cpu:
        # The shared-memory comm op JIT-compiles for ~1 min at every start and gloo does not need it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if on_cpu else torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_max(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_flags(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each flag true on any rank -> true on every rank (one small collective)."""
    if info.world_size == 1:
        return list(flags)
    import torch.distributed as dist

    tensor = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in tensor.tolist()]


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(barrier: bool = True) -> None:
    """Barrier and destroy the group: without it a rank sometimes aborts at exit (STACK_NOTES).
    barrier=False after a failure on this rank: the others may never reach a barrier."""
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
