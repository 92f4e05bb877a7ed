"""Exit-layer scoring: approximate per-sample MLM losses from the first k blocks of the model itself.

Runs through the engine's own module, so under ZeRO-3 the partitioned parameters are gathered by
DeepSpeed's module hooks. Every rank must call this at the same steps with the same exit layer
(ZeRO-3 gathers are collectives). The batch must already be on the model's device.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.masking import IGNORE_INDEX, masked_positions


def per_sample_loss(token_loss: torch.Tensor, sample_index: torch.Tensor, batch_size: int,
                    valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the masked tokens' losses per sample -> (loss (B,), masked-token count (B,)).

    `valid` (N,) leaves out padding positions (the static head's). A sample without masked tokens
    gets loss 0 and count 0."""
    total = torch.zeros(batch_size, dtype=torch.float32, device=token_loss.device)
    count = torch.zeros(batch_size, dtype=torch.float32, device=token_loss.device)
    weight = torch.ones_like(token_loss, dtype=torch.float32) if valid is None else valid.float()
    total.index_add_(0, sample_index, token_loss.float() * weight)
    count.index_add_(0, sample_index, weight)
    return total / count.clamp(min=1.0), count


def selection_scores(loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Samples with no masked token can teach nothing, and a non-finite loss says nothing: both rank
    below every other sample (-inf). A NaN would otherwise sort first in a descending top-k."""
    usable = (count > 0) & torch.isfinite(loss)
    return torch.where(usable, loss, torch.full_like(loss, float("-inf")))


def labels_at_mask_tokens(input_ids: torch.Tensor, labels: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The labels of the positions whose input is [MASK]; the others set to IGNORE_INDEX (sift_mask).

    BERT's masking leaves 10% of the chosen positions unchanged and replaces 10% by a random token.
    A model that has learnt to copy its input is near-certain (and right) on the kept ones and
    confidently wrong on the replaced ones, so their losses say how many replacements a sample drew,
    not how much it has left to teach (docs/PLATEAU_STUDY.md). The kept samples still train on all their
    labelled positions."""
    return torch.where(input_ids == mask_id, labels, torch.full_like(labels, IGNORE_INDEX))


@torch.no_grad()
def exit_layer_losses(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, exit_layer: int,
                      capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """embeddings -> blocks 1..exit_layer -> MLM head at masked positions -> (loss (B,), count (B,)).

    `model` is a pipeline.model.SparseMaskedLM (its `trunk` and `head`); exit_layer is validated by
    pipeline.config. Dropout is off while scoring; the module's train/eval mode is restored afterwards.
    `capacity`: the head at that many positions (static shapes, no host sync: pipeline.model.masked_positions)."""
    was_training = model.training
    model.eval()
    try:
        hidden = model.trunk(input_ids, exit_layer)  # (B, T, H)
        # The head at the masked positions only, and one per-token cross-entropy over the vocab
        # (sparse_mlm would add a second, summed one: ~15% of the head's time, docs/BENCHMARKS.md).
        if capacity is None:
            masked = labels != IGNORE_INDEX  # (B, T)
            logits = model.head(hidden[masked])  # (N, V)
            token_loss = F.cross_entropy(logits.float(), labels[masked], reduction="none")  # (N,)
            return per_sample_loss(token_loss, masked.nonzero(as_tuple=True)[0], input_ids.shape[0])
        positions, targets, _ = masked_positions(labels, capacity)  # (C,)
        logits = model.head(hidden.reshape(-1, hidden.shape[-1])[positions])  # (C, V)
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")  # (C,), 0 at padding
        return per_sample_loss(token_loss, positions // labels.shape[1], input_ids.shape[0],
                               valid=targets != IGNORE_INDEX)
    finally:
        model.train(was_training)
