"""Pre-LayerNorm BERT (model.pre_layernorm=true): the same parameters as HF BertForMaskedLM, rewired.

HF BERT is post-LN: x = LN(x + sublayer(x)). Pre-LN (as in Cramming) is x = x + sublayer(LN(x)), plus
one final LayerNorm before the MLM head. On a CPU budget post-LN BERT sits for a long time on the
"predict frequent words" plateau; pre-LN with a higher peak LR leaves it within minutes
(docs/PLATEAU_STUDY.md).

Each encoder layer is replaced in place by a `PreLNLayer` that reuses the original submodules (so
parameter names stay `attention.self.query`, `attention.output.LayerNorm`, ...), and the final
LayerNorm goes in front of the head's transform (`cls.predictions.transform`). Exit-layer scoring
(`pipeline/sift/scoring.py`: embeddings -> encoder.layer[:k] -> cls) therefore stays correct: every exit
gets the final LayerNorm through `cls`.

The result is NOT a standard HF BERT checkpoint (same names, different wiring): pipeline/config.py
refuses train.export=true together with model.pre_layernorm=true.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertForMaskedLM


class PreLNLayer(nn.Module):
    """x + attn(LN1(x)), then x + ffn(LN2(x)); LN1/LN2 are the layer's former post-LNs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.attention = layer.attention  # .self (attention), .output (dense, LayerNorm, dropout)
        self.intermediate = layer.intermediate  # dense + activation
        self.output = layer.output  # dense, LayerNorm, dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs
                ) -> torch.Tensor:
        attn = self.attention
        normed = attn.output.LayerNorm(hidden_states)
        context, _ = attn.self(normed, attention_mask=attention_mask)
        hidden_states = hidden_states + attn.output.dropout(attn.output.dense(context))
        inner = self.intermediate(self.output.LayerNorm(hidden_states))
        return hidden_states + self.output.dropout(self.output.dense(inner))


def to_pre_layernorm(mlm: BertForMaskedLM) -> BertForMaskedLM:
    """Rewire `mlm` in place to pre-LN and return it. Call before DeepSpeed wraps the model."""
    if getattr(mlm.config, "sift_pre_layernorm", False):
        return mlm
    layers = mlm.bert.encoder.layer
    for index in range(len(layers)):
        layers[index] = PreLNLayer(layers[index])
    hidden = mlm.config.hidden_size
    final = nn.LayerNorm(hidden, eps=mlm.config.layer_norm_eps)
    mlm.cls.predictions.transform = nn.Sequential(final, mlm.cls.predictions.transform)
    mlm.config.sift_pre_layernorm = True
    return mlm
