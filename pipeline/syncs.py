"""Counting host syncs: the places where the CPU waits for the accelerator to hand back a value.

On a GPU each of them stalls the launch queue: `.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.cpu()`,
and the ops whose output shape depends on the data (nonzero, boolean-mask indexing, masked_select,
unique, bincount). Counted on any device by the ops themselves (a torch dispatch mode and a function
mode), so a CPU test sees what a GPU run would wait for; each is attributed to the project or to
DeepSpeed by the Python stack that asked for it.

    with SyncCounter() as syncs:
        train_step(...)
    syncs.project, syncs.deepspeed, syncs.where  # counts, and the project lines that synced

On a CPU every tensor is a host tensor, so some counted reads would not sync on a GPU either: torch's
optimizer reading its CPU step counter is set apart (`other`).
"""
from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
            "bincount", "repeat_interleave"}
SYNC_METHODS = {"tolist", "cpu", "numpy"}  # item(), float(t), bool(t) reach the dispatch as _local_scalar_dense


class SyncCounter:
    """Counts host syncs inside the `with` block, by who asked: this project, DeepSpeed, or other."""

    def __init__(self) -> None:
        self.project = self.deepspeed = self.other = 0
        self.where: Counter[str] = Counter()
        outer = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._overloadpacket.__name__
                boolean_index = name == "index" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
                if (name in SYNC_OPS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size"))) \
                        or boolean_index:
                    outer._count(name)
                return func(*args, **(kwargs or {}))

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in SYNC_METHODS and args and isinstance(args[0], torch.Tensor) \
                        and not (name == "cpu" and args[0].device.type == "cpu"):
                    outer._count(name)
                return func(*args, **(kwargs or {}))

        self._modes = (_Function(), _Dispatch())

    def _count(self, what: str) -> None:
        """Attributed to the innermost frame of this project or of DeepSpeed (the model's forward runs
        under DeepSpeed's engine but is the project's code)."""
        for frame in reversed(traceback.extract_stack()[:-3]):
            if frame.filename.endswith("torch/optim/optimizer.py") and frame.name == "_get_value":
                self.other += 1  # torch's optimizer reading its step count: a CPU tensor on a GPU run too
                return
            if "/pipeline/" in frame.filename and not frame.filename.endswith("syncs.py"):
                self.project += 1
                self.where[f"{frame.filename.rsplit('/pipeline/', 1)[-1]}:{frame.lineno} {what}"] += 1
                return
            if "/deepspeed/" in frame.filename:
                self.deepspeed += 1
                return
        self.other += 1

    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
