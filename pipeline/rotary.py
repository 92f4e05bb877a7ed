"""Rotary positions for BERT (model.positions=rotary): RoPE on queries and keys in every layer, no
learned absolute position embeddings.

Why: on the CPU study's budget, post-LN BERT with learned absolute positions sits on the
context-free plateau for thousands of steps (it predicts the most frequent word at every [MASK]);
the same BERT with rotary positions leaves it within ~150 steps (docs/RESULTS.md, "Leaving the
plateau"). Norm placement alone does not do it (pre-LN with learned positions stays on the plateau).

Each layer's self-attention is replaced in place by `RotarySelfAttention`, which reuses the original
query/key/value Linear modules (parameter names unchanged) and runs SDPA; the position embedding
table is replaced by `NoPositions` (it adds nothing). Exit-layer scoring calls the same layers, so
every exit sees rotary positions. The result is NOT a standard Hugging Face BERT (same names,
other attention): pipeline/config.py refuses train.export=true with it (model.arch=modernbert is
the exportable rotary encoder).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertForMaskedLM

ROPE_THETA = 160_000.0  # as ModernBERT's global attention; the value the plateau pilots measured


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_tables(seq_len: int, head_dim: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim) in the half-rotation layout."""
    inverse = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inverse)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


class RotarySelfAttention(nn.Module):
    """BertSelfAttention's query/key/value with rotary positions on q and k; SDPA."""

    def __init__(self, attention: nn.Module, theta: float = ROPE_THETA) -> None:
        super().__init__()
        self.query, self.key, self.value = attention.query, attention.key, attention.value
        self.dropout = attention.dropout
        self.heads, self.head_dim = attention.num_attention_heads, attention.attention_head_size
        self.theta = theta

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs
                ) -> tuple[torch.Tensor, None]:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.heads, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        cos, sin = (t.to(device=q.device, dtype=q.dtype) for t in rope_tables(length, self.head_dim, self.theta))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # (B, heads, T, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                             dropout_p=self.dropout.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim), None


class NoPositions(nn.Module):
    """Stands in for the learned position embedding table: positions come from the attention."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)  # broadcasts, keeps the embeddings' dtype


def to_rotary(mlm: BertForMaskedLM, theta: float = ROPE_THETA) -> BertForMaskedLM:
    """Rewire `mlm` in place to rotary positions and return it. Call before DeepSpeed wraps the model."""
    for layer in mlm.bert.encoder.layer:
        attention = layer.attention
        attention.self = RotarySelfAttention(attention.self, theta)
    mlm.bert.embeddings.position_embeddings = NoPositions()
    mlm.config.sift_positions = "rotary"
    return mlm
