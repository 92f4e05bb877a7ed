"""Export a Hugging Face model directory that AutoModelForMaskedLM.from_pretrained loads.

With bf16/fp16 training the module holds 16-bit working copies of the weights; the optimizer keeps
the fp32 masters (partitioned under ZeRO). The export writes the fp32 masters, so nothing is lost to
a second rounding and the exported model is the one the optimizer trained.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import DistInfo, barrier

log = logging.getLogger(__name__)


def fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The trained weights at fp32 on the CPU, by the module's state_dict names (tied weights
    share their master). Every rank must call it: under ZeRO the masters are gathered collectively."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module.mlm
    masters: dict[int, torch.Tensor] = {}
    for param in module.parameters():  # each shared (tied) parameter once, in the same order on every rank
        full = safe_get_full_fp32_param(param)  # None without a mixed-precision or ZeRO optimizer
        if full is not None:
            masters[id(param)] = full.detach().float().cpu().reshape(param.ds_shape if hasattr(param, "ds_shape")
                                                                      else param.shape)
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        state[name] = masters[id(value)].clone() if id(value) in masters else value.detach().float().cpu().clone()
    return state


def export_hf(engine: Any, tokenizer_dir: str, export_dir: Path, info: DistInfo) -> Path:
    """save_pretrained of the trained BertForMaskedLM (fp32 masters) plus the tokenizer. Under ZeRO-3
    every rank takes part in gathering the partitioned parameters; rank 0 writes."""
    import deepspeed
    from transformers import AutoTokenizer

    module = engine.module.mlm
    stage3 = engine.zero_optimization_partition_weights()
    state = fp32_state_dict(engine)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=stage3):
        if info.is_main:  # the gathered module supplies the config and the tied-weight layout
            export_dir.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(str(export_dir), state_dict=state)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(export_dir))
            log.info("exported a Hugging Face model directory (fp32 weights) to %s", export_dir)
    barrier(info)
    return export_dir
