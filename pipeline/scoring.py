"""Exit-layer scoring: approximate per-sample MLM losses from the first k blocks of the model itself.

Runs through the engine's own module (`engine.module.mlm`), so under ZeRO-3 the partitioned
parameters are gathered by DeepSpeed's module hooks. Every rank must call this at the same steps
with the same exit layer (ZeRO-3 gathers are collectives).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import BertForMaskedLM

from pipeline.model import sparse_mlm
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
        out = sparse_mlm(mlm.cls, hidden, labels)
        token_loss = F.cross_entropy(out.logits.float(), out.targets, reduction="none")  # (N,)
        return per_sample_loss(token_loss, out.sample_index, input_ids.shape[0])
    finally:
        mlm.train(was_training)
