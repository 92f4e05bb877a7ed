"""Export a Hugging Face model directory that AutoModelForMaskedLM.from_pretrained loads."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.distributed import DistInfo, barrier

log = logging.getLogger(__name__)


def export_hf(engine: Any, tokenizer_dir: str, export_dir: Path, info: DistInfo) -> Path:
    """save_pretrained of the trained BertForMaskedLM plus the tokenizer. Under ZeRO-3 every rank
    takes part in gathering the partitioned parameters; rank 0 writes."""
    import deepspeed
    from transformers import AutoTokenizer

    mlm = engine.module.mlm
    stage3 = engine.zero_optimization_partition_weights()
    with deepspeed.zero.GatheredParameters(list(mlm.parameters()), modifier_rank=None, enabled=stage3):
        if info.is_main:
            export_dir.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().float().cpu().clone() for k, v in mlm.state_dict().items()}
            mlm.save_pretrained(str(export_dir), state_dict=state)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(export_dir))
            log.info("exported a Hugging Face model directory to %s", export_dir)
    barrier(info)
    return export_dir
