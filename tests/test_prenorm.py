"""model.pre_layernorm (pipeline/prenorm.py) and train.init_from (warm start, pipeline/checkpoint.py)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import tiny_config


def _tiny_mlm(pre_layernorm: bool, seed: int = 0):
    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(preset="tiny", dropout=0.0, pre_layernorm=pre_layernorm), vocab_size=50,
                        seq_len=16).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large random weights: BERT's 0.02 init makes every wiring nearly the identity
        for name, param in sorted(model.named_parameters()):
            if "transform.0." not in name:  # same values in both wirings, whatever pre-LN adds
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def _reference_pre_ln(mlm, input_ids: torch.Tensor) -> torch.Tensor:
    """Pre-LN written out by hand from the parameters: x += attn(LN1 x); x += ffn(LN2 x); LN_f; head."""
    x = mlm.bert.embeddings(input_ids=input_ids)
    for layer in mlm.bert.encoder.layer:
        a, o = layer.attention, layer.output
        h = a.output.LayerNorm(x)
        b, t, d = h.shape
        heads = a.self.num_attention_heads
        q, k, v = (lin(h).view(b, t, heads, d // heads).transpose(1, 2) for lin in (a.self.query, a.self.key,
                                                                                   a.self.value))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ v
        x = x + a.output.dense(att.transpose(1, 2).reshape(b, t, d))
        x = x + o.dense(F.gelu(layer.intermediate.dense(o.LayerNorm(x))))
    final, transform = mlm.cls.predictions.transform[0], mlm.cls.predictions.transform[1]
    return mlm.cls.predictions.decoder(transform(final(x))) + 0.0


def test_pre_ln_forward_matches_a_hand_written_pre_ln_transformer():
    model = _tiny_mlm(pre_layernorm=True)
    ids = torch.randint(5, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.mlm(input_ids=ids).logits
        want = _reference_pre_ln(model.mlm, ids)
    assert torch.allclose(got, want, atol=1e-5)
    post = _tiny_mlm(pre_layernorm=False)
    with torch.no_grad():  # same seed, same parameter values, different wiring -> different logits
        assert not torch.allclose(post.mlm(input_ids=ids).logits, got, atol=1e-3)


def test_default_stays_post_ln_and_parameter_names_are_unchanged():
    post, pre = _tiny_mlm(pre_layernorm=False), _tiny_mlm(pre_layernorm=True)
    assert type(post.mlm.bert.encoder.layer[0]).__name__ == "BertLayer"
    assert type(pre.mlm.bert.encoder.layer[0]).__name__ == "PreLNLayer"
    extra = set(pre.state_dict()) - set(post.state_dict())
    assert extra == {"mlm.cls.predictions.transform.0.weight", "mlm.cls.predictions.transform.0.bias",
                     "mlm.cls.predictions.transform.1.dense.weight", "mlm.cls.predictions.transform.1.dense.bias",
                     "mlm.cls.predictions.transform.1.LayerNorm.weight",
                     "mlm.cls.predictions.transform.1.LayerNorm.bias"}
    assert pre.mlm.cls.predictions.decoder.weight is pre.mlm.bert.embeddings.word_embeddings.weight


def test_exit_layer_scoring_at_the_last_layer_equals_the_full_pre_ln_model():
    from pipeline.sift.scoring import exit_layer_losses
    from pipeline.sift.scoring import per_sample_loss

    model = _tiny_mlm(pre_layernorm=True)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 50, (4, 16), generator=gen)
    labels = torch.where(torch.rand(4, 16, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one masked token per sample
    labels[1:, 1] = ids[1:, 1]
    loss, count = exit_layer_losses(model, ids, labels, exit_layer=model.num_layers)
    with torch.no_grad():
        out = model(ids, labels)
    want, want_count = per_sample_loss(F.cross_entropy(out.logits, out.targets, reduction="none"),
                                       out.sample_index, 4)
    assert torch.equal(count, want_count)
    assert torch.allclose(loss, want, atol=1e-5)
    shallow, _ = exit_layer_losses(model, ids, labels, exit_layer=1)
    assert not torch.allclose(shallow, loss, atol=1e-4)


def test_pre_ln_refuses_export(tmp_path):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.export"):
        load_config(None, ["model.pre_layernorm=true"])
    assert load_config(None, ["model.pre_layernorm=true", "train.export=false"]).model.pre_layernorm


def test_init_from_loads_module_weights_only_into_a_new_run(tiny_data, tmp_path, dist_info):
    from pipeline.config import ConfigError
    from pipeline.model import build_model
    from pipeline.checkpoint import load_module_weights
    from pipeline.train import train

    warm_dir, branch_dir = tmp_path / "warm", tmp_path / "branch"
    common = ("model.pre_layernorm=true", "train.export=false")
    train(tiny_config(tiny_data, warm_dir, *common, "train.max_steps=4"), dist_info)
    warm_state = torch.load(warm_dir / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt",
                            weights_only=False)["module"]

    cfg = tiny_config(tiny_data, branch_dir, *common, f"train.init_from={warm_dir}", "train.max_steps=2",
                      "train.lr=1.0e-12", "train.warmup_steps=0")
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    fresh = build_model(cfg.model, manifest["vocab_size"], manifest["seq_len"])
    assert not torch.equal(fresh.state_dict()["mlm.bert.embeddings.word_embeddings.weight"],
                           warm_state["mlm.bert.embeddings.word_embeddings.weight"])
    load_module_weights(fresh, str(warm_dir))  # a run dir: the newest complete checkpoint in it
    for key, value in warm_state.items():
        assert torch.equal(fresh.state_dict()[key], value), key

    train(cfg, dist_info)  # counters start at 0, a new MLflow run; with lr ~0 the weights stay the warm ones
    steps = [json.loads(line)["step"] for line in (branch_dir / "metrics.jsonl").read_text().splitlines()
             if '"train/loss"' in line]
    assert steps == [1, 2]
    warm_run = json.loads((warm_dir / "mlflow_run.json").read_text())
    branch_run = json.loads((branch_dir / "mlflow_run.json").read_text())
    assert warm_run != branch_run
    branch_state = torch.load(branch_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                              weights_only=False)["module"]
    key = "mlm.bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(branch_state[key], warm_state[key], atol=1e-6)

    post_ln = build_model(tiny_config(tiny_data, tmp_path / "x").model, manifest["vocab_size"], manifest["seq_len"])
    with pytest.raises(ConfigError, match="train.init_from"):
        load_module_weights(post_ln, str(warm_dir))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        load_module_weights(post_ln, str(tmp_path / "nothing"))
