"""The masked-LM models, with the MLM head evaluated only at masked positions.

Two architectures (model.arch), each a thin wrapper over a plain transformers model in `self.mlm`
(so it exports with save_pretrained and loads with AutoModelForMaskedLM):
- `bert`: BertForMaskedLM, learned absolute positions, post-LN (pre-LN with model.pre_layernorm);
- `modernbert`: ModernBertForMaskedLM, rotary positions, pre-norm, gated MLP, no linear biases,
  global attention in every layer (the sequences here are short).
Besides `forward(input_ids, labels)` each exposes the two pieces exit-layer scoring needs
(pipeline/sift/scoring.py): `trunk(ids, k)`, the hidden states the head sees after the first k
blocks, and `head(hidden)`, the model's own MLM head. `trunk(ids, num_layers)` is the full model.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from pipeline.config import ModelConfig
from pipeline.masking import IGNORE_INDEX, masked_positions


class MLMOutput(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy over all masked tokens of the batch
    logits: torch.Tensor  # (N, V) at the N masked positions
    targets: torch.Tensor  # (N,)
    sample_index: torch.Tensor  # (N,) which sample each masked position belongs to


def sparse_mlm(head, hidden: torch.Tensor, labels: torch.Tensor, capacity: int | None = None) -> MLMOutput:
    """Apply the MLM head only at the masked positions (sparse prediction, as in Cramming); with
    `capacity`, at a fixed number of positions (masked_positions)."""
    batch, length = labels.shape
    if capacity is None:  # the exact path: the CPU default, bit for bit what the golden runs recorded
        masked = labels != IGNORE_INDEX  # (B, T)
        sample_index = masked.nonzero(as_tuple=True)[0]  # (N,)
        logits = head(hidden[masked])  # (N, V)
        targets = labels[masked]  # (N,)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / targets.numel() \
            if targets.numel() else logits.sum() * 0.0
        return MLMOutput(loss, logits, targets, sample_index)
    positions, targets, count = masked_positions(labels, capacity)
    logits = head(hidden.reshape(batch * length, -1)[positions])  # (C, V)
    loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / count.clamp(min=1)
    return MLMOutput(loss, logits, targets, positions // length)


class SparseMaskedLM(nn.Module):
    """BERT: forward(input_ids, labels) -> MLMOutput; `self.mlm` is a transformers BertForMaskedLM."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.mlm = BertForMaskedLM(config)

    @property
    def num_layers(self) -> int:
        return self.mlm.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, capacity: int | None = None) -> MLMOutput:
        hidden = self.mlm.bert(input_ids=input_ids).last_hidden_state  # (B, T, H); packed: no padding mask
        return sparse_mlm(self.head, hidden, labels, capacity)

    def trunk(self, input_ids: torch.Tensor, layers: int) -> torch.Tensor:
        """Embeddings, then blocks 1..layers: the hidden states (B, T, H) an exit at `layers` sees.
        Each submodule is called through its own __call__, so ZeRO-3 gathers its parameters."""
        hidden = self.mlm.bert.embeddings(input_ids=input_ids)
        for layer in self.mlm.bert.encoder.layer[:layers]:
            hidden = layer(hidden)  # packed sequences: no attention mask needed
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head on hidden states (N, H) -> logits (N, V); pre-LN's final norm is inside it."""
        return self.mlm.cls(hidden)


class SparseModernMLM(SparseMaskedLM):
    """ModernBERT: the same interface; `self.mlm` is a transformers ModernBertForMaskedLM."""

    def __init__(self, config: ModernBertConfig) -> None:
        nn.Module.__init__(self)
        self.mlm = ModernBertForMaskedLM(config)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, capacity: int | None = None) -> MLMOutput:
        hidden = self.mlm.model(input_ids=input_ids).last_hidden_state  # (B, T, H), final norm applied
        return sparse_mlm(self.head, hidden, labels, capacity)

    def trunk(self, input_ids: torch.Tensor, layers: int) -> torch.Tensor:
        """Embeddings, blocks 1..layers (rotary positions), then the final norm, as the full model does."""
        model = self.mlm.model
        hidden = model.embeddings(input_ids=input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        rotary = model.rotary_emb(hidden, positions, "full_attention")  # every layer attends globally
        for layer in model.layers[:layers]:
            hidden = layer(hidden, attention_mask=None, position_embeddings=rotary)
        return model.final_norm(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm.decoder(self.mlm.head(hidden))


def bert_config(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_id: int = 0) -> BertConfig:
    """The shape is validated in pipeline.config, max_position against the data in pipeline.preflight."""
    layers, hidden, heads, inner = cfg.shape
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inner,
                      max_position_embeddings=cfg.max_position or seq_len, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad_id)


def modernbert_config(cfg: ModelConfig, vocab_size: int, seq_len: int, special_ids: dict[str, int]) -> ModernBertConfig:
    """The preset's sizes (the gated MLP's inner width is model.intermediate_size), global attention in
    every layer, SDPA, transformers' defaults otherwise."""
    layers, hidden, heads, inner = cfg.shape
    return ModernBertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=inner,
                            max_position_embeddings=cfg.max_position or seq_len,
                            layer_types=["full_attention"] * layers, local_attention=2 * seq_len,
                            embedding_dropout=cfg.dropout, attention_dropout=cfg.dropout, mlp_dropout=cfg.dropout,
                            pad_token_id=special_ids["pad"], cls_token_id=special_ids["cls"],
                            sep_token_id=special_ids["sep"], bos_token_id=special_ids["cls"],
                            eos_token_id=special_ids["sep"], attn_implementation="sdpa")


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, special_ids: dict[str, int] | None = None
                ) -> SparseMaskedLM:
    """The model of model.arch; `special_ids` are the manifest's (pad, cls, sep, mask)."""
    special_ids = special_ids or {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    if cfg.arch == "modernbert":
        return SparseModernMLM(modernbert_config(cfg, vocab_size, seq_len, special_ids))
    model = SparseMaskedLM(bert_config(cfg, vocab_size, seq_len, special_ids["pad"]))
    if cfg.positions == "rotary":
        from pipeline.rotary import to_rotary

        to_rotary(model.mlm)
    if cfg.pre_layernorm:
        from pipeline.prenorm import to_pre_layernorm

        to_pre_layernorm(model.mlm)
    return model


def attention_backend(model: SparseMaskedLM) -> str:
    """The attention implementation transformers chose ("sdpa", "eager", ...): logged at start."""
    return str(getattr(model.mlm.config, "_attn_implementation", "unknown"))


def num_parameters(model: nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
