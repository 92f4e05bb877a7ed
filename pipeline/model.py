"""BERT for masked-LM pretraining, with the MLM head evaluated only at masked positions.

`SparseMaskedLM` is the module the DeepSpeed engine wraps. Besides `forward(input_ids, labels)` it
exposes the two pieces exit-layer scoring needs (pipeline/sift/scoring.py): `trunk(ids, k)`, the
embeddings and the first k blocks, and `head(hidden)`, the model's own MLM head.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from pipeline.config import ModelConfig
from pipeline.masking import IGNORE_INDEX


def bert_config(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_id: int = 0) -> BertConfig:
    """The shape is validated in pipeline.config, max_position against the data in pipeline.preflight."""
    layers, hidden, heads, inner = cfg.shape
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inner,
                      max_position_embeddings=cfg.max_position or seq_len, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad_id)


class MLMOutput(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy over all masked tokens of the batch
    logits: torch.Tensor  # (N, V) at the N masked positions
    targets: torch.Tensor  # (N,)
    sample_index: torch.Tensor  # (N,) which sample each masked position belongs to


def sparse_mlm(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> MLMOutput:
    """Apply the MLM head only where labels != IGNORE_INDEX (sparse prediction, as in Cramming)."""
    masked = labels != IGNORE_INDEX  # (B, T)
    sample_index = masked.nonzero(as_tuple=True)[0]  # (N,)
    logits = head(hidden[masked])  # (N, V)
    targets = labels[masked]  # (N,)
    loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / targets.numel() if targets.numel() \
        else logits.sum() * 0.0
    return MLMOutput(loss, logits, targets, sample_index)


class SparseMaskedLM(nn.Module):
    """forward(input_ids, labels) -> MLMOutput. `self.mlm` is a plain transformers BertForMaskedLM, so
    it exports with save_pretrained."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.mlm = BertForMaskedLM(config)

    @property
    def num_layers(self) -> int:
        return self.mlm.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> MLMOutput:
        hidden = self.mlm.bert(input_ids=input_ids).last_hidden_state  # (B, T, H); packed: no padding mask
        return sparse_mlm(self.mlm.cls, hidden, labels)

    def trunk(self, input_ids: torch.Tensor, layers: int) -> torch.Tensor:
        """Embeddings, then blocks 1..layers: the hidden states (B, T, H) an exit at `layers` sees.
        Each submodule is called through its own __call__, so ZeRO-3 gathers its parameters."""
        hidden = self.mlm.bert.embeddings(input_ids=input_ids)
        for layer in self.mlm.bert.encoder.layer[:layers]:
            hidden = layer(hidden)  # packed sequences: no attention mask needed
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head on hidden states (N, H) -> logits (N, V)."""
        return self.mlm.cls(hidden)


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_id: int = 0) -> SparseMaskedLM:
    model = SparseMaskedLM(bert_config(cfg, vocab_size, seq_len, pad_id))
    if cfg.pre_layernorm:
        from pipeline.prenorm import to_pre_layernorm

        to_pre_layernorm(model.mlm)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
