"""model.positions=rotary (pipeline/rotary.py): BERT with rotary positions instead of learned ones."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.model import build_model
from pipeline.rotary import rope_tables, rotate_half
from pipeline.sift.scoring import exit_layer_losses, per_sample_loss
from tests.conftest import tiny_config


def _model(pre_layernorm: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", dropout=dropout, positions="rotary", pre_layernorm=pre_layernorm),
                       vocab_size=50, seq_len=16)


def test_attention_is_rope_written_out_by_hand():
    """softmax(R(q) R(k)^T / sqrt(d)) v with R rotating each pair (i, i + d/2) by position * theta^(-2i/d)."""
    model = _model().eval()
    attention = model.mlm.bert.encoder.layer[0].attention.self
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    heads, d = attention.heads, attention.head_dim
    q, k, v = (lin(x).view(2, 16, heads, d).transpose(1, 2) for lin in (attention.query, attention.key, attention.value))
    position = torch.arange(16, dtype=torch.float32)[:, None]
    angle = position * 160_000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # (T, d/2)
    c, s = angle.cos(), angle.sin()

    def rotate(t):  # pairs (i, i + d/2)
        a, b = t[..., : d // 2], t[..., d // 2:]
        return torch.cat((a * c - b * s, a * s + b * c), dim=-1)

    weights = torch.softmax(rotate(q) @ rotate(k).transpose(-1, -2) / d ** 0.5, dim=-1)
    want = (weights @ v).transpose(1, 2).reshape(2, 16, 32)
    with torch.no_grad():
        got, _ = attention(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cos, sin = rope_tables(16, d)
    assert torch.equal(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0])) and cos.shape == (16, d)


def test_no_learned_positions_and_scores_depend_on_relative_position_only():
    """A token pair's attention logit is the same wherever the pair sits: shifting a pattern keeps it."""
    model = _model().eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any("position_embeddings" in n for n in names)
    attention = model.mlm.bert.encoder.layer[0].attention.self
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2))
    d = attention.head_dim
    cos, sin = rope_tables(16, d)
    same = x[:, :1].expand(1, 16, 32)  # one token's content at every position
    q, k = (lin(same).view(1, 16, attention.heads, d).transpose(1, 2) for lin in (attention.query, attention.key))
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    logits = (q @ k.transpose(-1, -2))[0, 0]  # (T, T): query position i, key position j
    for offset in (0, 3, -5):
        diagonal = torch.diagonal(logits, offset)
        torch.testing.assert_close(diagonal, torch.full_like(diagonal, diagonal[0].item()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_the_last_exit_is_the_exact_loss(tiny_data, pre_layernorm):
    from pipeline.data import eval_batches
    from pipeline.manifest import Manifest
    from pipeline.masking import mask_spec

    manifest = Manifest.load(str(tiny_data))
    batch = eval_batches(manifest, mask_spec(tiny_config(tiny_data, tiny_data).data, manifest), samples=8, batch=8,
                         rank=0, world=1)[0]
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", positions="rotary", pre_layernorm=pre_layernorm),
                        manifest.vocab_size, manifest.seq_len, manifest.special_ids).eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["labels"])
        exact = per_sample_loss(torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none"),
                                out.sample_index, 8)[0]
    torch.testing.assert_close(exit_layer_losses(model, batch["input_ids"], batch["labels"], 2)[0], exact,
                               rtol=1e-5, atol=1e-5)


def test_rotary_bert_trains_with_sift_under_zero3(tiny_data, tmp_path, dist_info):
    from tests.fault_helpers import journal

    from pipeline.train import train

    cfg = tiny_config(tiny_data, tmp_path, "model.positions=rotary", "train.export=false", "select.policy=sift",
                      "train.max_steps=3", "train.ds_configs=[ds_configs/base.json, ds_configs/zero3.json, tests/ds_configs/zero3_partition_all.json]")
    metrics = train(cfg, dist_info)
    assert sorted(journal(tmp_path, "train/loss")) == [1, 2, 3] and 0 <= metrics["eval/mask_accuracy"] <= 1


def test_config_refuses_an_export_it_cannot_write_and_rotary_modernbert():
    with pytest.raises(ConfigError, match=r"not a standard Hugging Face BERT.*\(train.export\)"):
        load_config(None, ["model.positions=rotary", "train.export=true"])
    with pytest.raises(ConfigError, match=r"rewires BERT only.*\(model.positions\)"):
        load_config(None, ["model.positions=rotary", "model.arch=modernbert", "train.export=false"])
