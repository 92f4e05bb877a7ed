"""Validation: MLM loss and masked-token accuracy with fixed masks, summed over all ranks."""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from pipeline.distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(engine: Any, batches: list[dict], info: DistInfo, vocab_size: int) -> dict[str, float]:
    was_training = engine.module.training
    engine.eval()
    loss_sum = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, tokens
    predicted = torch.zeros(vocab_size, dtype=torch.float64, device=info.device)
    try:
        for batch in batches:
            out = engine(batch["input_ids"].to(info.device), batch["labels"].to(info.device))
            prediction = out.logits.argmax(dim=-1)  # (N,)
            loss_sum[0] += F.cross_entropy(out.logits.float(), out.targets, reduction="sum").double()
            loss_sum[1] += (prediction == out.targets).sum()
            loss_sum[2] += out.targets.numel()
            predicted += torch.bincount(prediction, minlength=vocab_size).double()
    finally:
        engine.train(was_training)
    all_reduce_sum(loss_sum, info)
    all_reduce_sum(predicted, info)
    tokens = max(loss_sum[2].item(), 1.0)
    return {"eval/loss": loss_sum[0].item() / tokens, "eval/accuracy": loss_sum[1].item() / tokens,
            "eval/distinct_predictions": float((predicted > 0).sum().item())}
