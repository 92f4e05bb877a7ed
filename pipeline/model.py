"""BERT for masked-LM pretraining, with the MLM head evaluated only at masked positions."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from pipeline.config import ModelConfig
from pipeline.data import IGNORE_INDEX

# layers, hidden, heads, intermediate
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 32, 2, 64),  # tests
    "mini": (4, 256, 4, 1024),  # CPU studies
    "base": (12, 768, 12, 3072),  # BERT-base, as in the paper
    "large": (24, 1024, 16, 4096),
}


def bert_config(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_id: int = 0) -> BertConfig:
    layers, hidden, heads, inner = PRESETS[cfg.preset]
    hidden = cfg.hidden_size or hidden
    heads = cfg.num_heads or heads
    if hidden % heads:
        raise ValueError(f"model.hidden_size {hidden} is not divisible by model.num_heads {heads}")
    max_position = cfg.max_position or seq_len
    if seq_len > max_position:
        raise ValueError(f"model.max_position {max_position} < the data's seq_len {seq_len}")
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=cfg.num_layers or layers,
                      num_attention_heads=heads, intermediate_size=cfg.intermediate_size or inner,
                      max_position_embeddings=max_position, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad_id)


class MLMOutput(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy over all masked tokens of the batch
    logits: torch.Tensor  # (N, V) at the N masked positions
    targets: torch.Tensor  # (N,)
    sample_index: torch.Tensor  # (N,) which sample each masked position belongs to


def sparse_mlm(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> MLMOutput:
    """Apply the MLM head only where labels != -100 (sparse prediction, as in Cramming)."""
    masked = labels != IGNORE_INDEX  # (B, T)
    sample_index = masked.nonzero(as_tuple=True)[0]  # (N,)
    logits = head(hidden[masked])  # (N, V)
    targets = labels[masked]  # (N,)
    loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / targets.numel() if targets.numel() \
        else logits.sum() * 0.0
    return MLMOutput(loss, logits, targets, sample_index)


class SparseMaskedLM(nn.Module):
    """The module the DeepSpeed engine wraps: forward(input_ids, labels) -> MLMOutput.

    `self.mlm` is a plain transformers BertForMaskedLM, so its parts (embeddings, encoder layers,
    the `cls` head) are reachable for exit-layer scoring and it exports with save_pretrained."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.mlm = BertForMaskedLM(config)

    @property
    def num_layers(self) -> int:
        return self.mlm.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> MLMOutput:
        hidden = self.mlm.bert(input_ids=input_ids).last_hidden_state  # (B, T, H); packed: no padding mask
        return sparse_mlm(self.mlm.cls, hidden, labels)


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_id: int = 0) -> SparseMaskedLM:
    model = SparseMaskedLM(bert_config(cfg, vocab_size, seq_len, pad_id))
    if cfg.pre_layernorm:
        from pipeline.prenorm import to_pre_layernorm

        to_pre_layernorm(model.mlm)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
