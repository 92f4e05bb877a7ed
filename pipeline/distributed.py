"""Process-group set-up for one process, torchrun and the deepspeed launcher, CPU (gloo) or GPU."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

from pipeline.errors import InputError

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


GPU_REQUEST_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


class DeviceError(InputError):
    """GPUs were asked for and none is usable (exit 2, like any other bad input)."""


def choose_device(requested: str = "auto", env: dict[str, str] | None = None) -> str:
    """"cpu" or "cuda" for train.device (auto | cpu | cuda), failing fast instead of falling back.

    A job that asks for GPUs (train.device=cuda, DS_ACCELERATOR=cuda, or GPUs handed to it by the
    deepspeed launcher or Slurm) on a CPU-only torch or a broken driver would otherwise train on
    the CPU with gloo, slowly and without a word. DS_ACCELERATOR=cpu says CPU explicitly (the
    deepspeed launcher on CPU sets CUDA_VISIBLE_DEVICES too)."""
    env = os.environ if env is None else env
    if requested == "cpu" or (requested == "auto" and env.get("DS_ACCELERATOR") == "cpu"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    asked = [f"train.device={requested}"] if requested == "cuda" else []
    asked += [f"DS_ACCELERATOR={env['DS_ACCELERATOR']}"] if env.get("DS_ACCELERATOR") == "cuda" else []
    asked += [f"{name}={env[name]}" for name in GPU_REQUEST_VARS if env.get(name, "") not in ("", "-1", "NoDevFiles")]
    if asked:
        why = "built without CUDA" if torch.version.cuda is None else "no usable CUDA device or driver"
        raise DeviceError(f"GPUs were asked for ({', '.join(asked)}) but none is usable (torch {torch.__version__}: "
                          f"{why})", "train.device",
                          "install torch's CUDA build (README, 'Two commands': make setup TORCH_INDEX=...cu128) "
                          "or run on the CPU with --set train.device=cpu")
    return "cpu"


def prepare_environment(device: str = "auto") -> str:
    """Call before importing deepspeed: choose the device and DeepSpeed's accelerator to match."""
    chosen = choose_device(device)
    os.environ["DS_ACCELERATOR"] = chosen
    return chosen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise (once per process) and describe this rank. A lone process becomes rank 0 of 1.
    `device` is train.device; DeviceError when GPUs were asked for and none is usable."""
    prepare_environment(device)
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


def device_name(device: torch.device) -> str:
    """The GPU's name as CUDA gives it ("NVIDIA H100 80GB HBM3"): it picks the peak in pipeline/flops.py."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """Each value's maximum over the ranks (one small collective): every rank then decides alike."""
    if info.world_size == 1:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


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
