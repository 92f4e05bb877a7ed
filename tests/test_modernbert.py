"""model.arch=modernbert (rotary positions, pre-norm, gated MLP) has everything BERT has: exit-layer
scoring at every exit, ZeRO-3, exact resume, a Hugging Face export, SDPA attention."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data import eval_batches
from pipeline.manifest import Manifest
from pipeline.masking import mask_spec
from pipeline.model import attention_backend, build_model
from pipeline.sift.scoring import exit_layer_losses, per_sample_loss
from tests.conftest import tiny_config

MODERN = "model.arch=modernbert"


def _batch(data_dir, samples: int = 16):
    manifest = Manifest.load(str(data_dir))
    cfg = tiny_config(data_dir, data_dir, MODERN)
    return manifest, eval_batches(manifest, mask_spec(cfg.data, manifest), samples=samples, batch=samples,
                                  rank=0, world=1)[0]


def _model(manifest, dropout: float = 0.0):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="modernbert", preset="tiny", dropout=dropout), manifest.vocab_size,
                       manifest.seq_len, manifest.special_ids)


def test_forward_is_transformers_own_modernbert_at_the_masked_positions(tiny_data):
    manifest, batch = _batch(tiny_data)
    model = _model(manifest).eval()
    masked = batch["labels"] != -100
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["labels"]).logits
        theirs = model.mlm(input_ids=batch["input_ids"]).logits[masked]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert attention_backend(model) == "sdpa"
    bert = build_model(ModelConfig(preset="tiny"), manifest.vocab_size, manifest.seq_len, manifest.special_ids)
    assert attention_backend(bert) == "sdpa"


def test_scoring_at_every_exit_and_the_last_exit_is_the_exact_loss(tiny_data):
    manifest, batch = _batch(tiny_data)
    model = _model(manifest, dropout=0.2).train()
    layers = model.num_layers
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["labels"])
        token_loss = torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
        exact = per_sample_loss(token_loss, out.sample_index, 16)[0]
    model.train()
    by_exit = {k: exit_layer_losses(model, batch["input_ids"], batch["labels"], k)[0] for k in range(layers + 1)}
    assert model.training, "scoring must restore train mode"
    torch.testing.assert_close(by_exit[layers], exact, rtol=1e-5, atol=1e-5)
    for k in range(layers):
        assert torch.isfinite(by_exit[k]).all() and not torch.allclose(by_exit[k], exact), k


def _kept_and_losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "keys" / "rank00000.jsonl").read_text().splitlines()]
    return [r["kept"] for r in records], [r["loss"] for r in records]


def test_zero3_scores_selects_and_trains_like_zero0(tiny_data, tmp_path, dist_info):
    from pipeline.train import train

    results = {}
    for stage in (0, 3):
        ds = "[ds_configs/base.json" + (", ds_configs/zero3.json, tests/ds_configs/zero3_partition_all.json]" if stage else "]")
        cfg = tiny_config(tiny_data, tmp_path / f"z{stage}", MODERN, "select.policy=sift", "train.max_steps=4",
                          f"train.ds_configs={ds}", "train.record_keys=true", "train.export=false",
                          "tracking.enabled=false")
        train(cfg, dist_info)
        results[stage] = _kept_and_losses(tmp_path / f"z{stage}")
    (kept0, loss0), (kept3, loss3) = results[0], results[3]
    assert kept0 == kept3
    assert loss0 == pytest.approx(loss3, abs=1e-5)


def test_resume_continues_exactly_and_the_export_loads(tiny_data, tmp_path, dist_info):
    """A run stopped after its step-3 checkpoint and resumed ends with the weights of an unbroken
    one (the LR is flat after warmup, so max_steps does not change the schedule), and trains each
    step once. Checked to fail with train.resume=false on the second call (steps 0-2 twice)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from pipeline.train import train

    run = [MODERN, "select.policy=sift", "model.dropout=0.1", "train.min_lr_ratio=1.0", "train.ckpt_every=3",
           "train.record_keys=true", "tracking.enabled=false"]
    train(tiny_config(tiny_data, tmp_path / "straight", *run, "train.max_steps=6"), dist_info)
    train(tiny_config(tiny_data, tmp_path / "resumed", *run, "train.max_steps=3", "train.export=false"), dist_info)
    train(tiny_config(tiny_data, tmp_path / "resumed", *run, "train.max_steps=6"), dist_info)
    a = load_file(tmp_path / "straight" / "export" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "keys" / "rank00000.jsonl").open()]
    assert steps == list(range(6))

    manifest, batch = _batch(tiny_data)
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "straight" / "export").eval()
    assert type(exported).__name__ == "ModernBertForMaskedLM"
    model = _model(manifest).eval()
    model.mlm.load_state_dict(exported.state_dict())
    with torch.no_grad():
        masked = batch["labels"] != -100
        torch.testing.assert_close(exported(input_ids=batch["input_ids"]).logits[masked],
                                   model(batch["input_ids"], batch["labels"]).logits, rtol=1e-5, atol=1e-5)
