"""Validation: MLM loss and masked-token accuracy with fixed masks, summed over all ranks."""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from pipeline.masking import IGNORE_INDEX
from pipeline.distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(engine: Any, batches: list[dict], info: DistInfo, vocab_size: int, mask_id: int) -> dict[str, float]:
    """eval/accuracy and eval/loss over every labelled position, and at the [MASK] positions alone
    (eval/mask_accuracy, eval/mask_loss): on a kept position the answer is in the input, so copying
    alone scores ~10% accuracy; the [MASK] positions show what the model has learnt from context."""
    was_training = engine.module.training
    engine.eval()
    loss_sum = torch.zeros(6, dtype=torch.float64, device=info.device)  # loss, correct, tokens; same at [MASK]
    predicted = torch.zeros(vocab_size, dtype=torch.float64, device=info.device)
    try:
        for batch in batches:
            input_ids, labels = batch["input_ids"].to(info.device), batch["labels"].to(info.device)
            out = engine(input_ids, labels)
            prediction = out.logits.argmax(dim=-1)  # (N,)
            token_loss = F.cross_entropy(out.logits.float(), out.targets, reduction="none").double()
            correct = (prediction == out.targets).double()
            at_mask = input_ids[labels != IGNORE_INDEX] == mask_id  # (N,)
            loss_sum += torch.stack([token_loss.sum(), correct.sum(), correct.new_tensor(float(correct.numel())),
                                     token_loss[at_mask].sum(), correct[at_mask].sum(), at_mask.sum().double()])
            predicted += torch.bincount(prediction, minlength=vocab_size).double()
    finally:
        engine.train(was_training)
    all_reduce_sum(loss_sum, info)
    all_reduce_sum(predicted, info)
    tokens, at_mask = max(loss_sum[2].item(), 1.0), max(loss_sum[5].item(), 1.0)
    return {"eval/loss": loss_sum[0].item() / tokens, "eval/accuracy": loss_sum[1].item() / tokens,
            "eval/mask_loss": loss_sum[3].item() / at_mask, "eval/mask_accuracy": loss_sum[4].item() / at_mask,
            "eval/distinct_predictions": float((predicted > 0).sum().item())}
