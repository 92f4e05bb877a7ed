"""Exit-layer scoring: approximate per-sample MLM losses from the first k blocks of the model itself.

Runs through the engine's own module (`engine.module.mlm`), so under ZeRO-3 the partitioned
parameters are gathered by DeepSpeed's module hooks. Every rank must call this at the same steps
with the same exit layer (ZeRO-3 gathers are collectives).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import BertForMaskedLM

from pipeline.data import IGNORE_INDEX
from pipeline.selection import per_sample_loss


@torch.no_grad()
def exit_layer_losses(mlm: BertForMaskedLM, input_ids: torch.Tensor, labels: torch.Tensor, exit_layer: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """embeddings -> blocks 1..exit_layer -> MLM head at masked positions -> (loss (B,), count (B,)).

    Dropout is off while scoring; the module's train/eval mode is restored afterwards."""
    num_layers = mlm.config.num_hidden_layers
    if not 0 <= exit_layer <= num_layers:
        raise ValueError(f"select.exit_layer {exit_layer} is outside 0..{num_layers}")
    was_training = mlm.training
    mlm.eval()
    try:
        hidden = mlm.bert.embeddings(input_ids=input_ids)  # (B, T, H)
        for layer in mlm.bert.encoder.layer[:exit_layer]:
            hidden = layer(hidden)  # packed sequences: no attention mask needed
        # The head at the masked positions only, and one per-token cross-entropy over the vocab
        # (sparse_mlm would add a second, summed one: ~15% of the head's time, docs/BENCHMARKS.md).
        masked = labels != IGNORE_INDEX  # (B, T)
        logits = mlm.cls(hidden[masked])  # (N, V)
        token_loss = F.cross_entropy(logits.float(), labels[masked], reduction="none")  # (N,)
        return per_sample_loss(token_loss, masked.nonzero(as_tuple=True)[0], input_ids.shape[0])
    finally:
        mlm.train(was_training)
