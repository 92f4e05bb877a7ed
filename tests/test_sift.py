"""SIFT through the real model and engine: exit-layer scoring, gradient equivalence, ZeRO-3, two ranks."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data import eval_batches, rank_shards
from pipeline.manifest import Manifest
from pipeline.masking import MaskSpec
from pipeline.model import build_model
from pipeline.sift.policies import topk_keep
from pipeline.sift.scoring import exit_layer_losses, labels_at_mask_tokens, per_sample_loss
from tests.conftest import REPO, clean_env, free_port, tiny_config


def _batch(data_dir: Path, samples: int = 16) -> tuple[Manifest, dict]:
    manifest = Manifest.load(str(data_dir))
    spec = MaskSpec(0.15, manifest.vocab_size, manifest.special_ids["mask"],
                    tuple(sorted(set(manifest.special_ids.values()))))
    return manifest, eval_batches(manifest, spec, samples=samples, batch=samples, rank=0, world=1)[0]


def _exact_per_sample(model, batch) -> torch.Tensor:
    out = model(batch["input_ids"], batch["labels"])
    token_loss = torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
    return per_sample_loss(token_loss, out.sample_index, batch["input_ids"].shape[0])[0]


def test_exit_at_the_last_layer_gives_the_exact_loss_and_restores_train_mode(tiny_data):
    manifest, batch = _batch(tiny_data)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", dropout=0.3), manifest.vocab_size, manifest.seq_len)
    model.train()
    approx, count = exit_layer_losses(model, batch["input_ids"], batch["labels"], exit_layer=2)
    assert model.training, "scoring must restore train mode"
    again, _ = exit_layer_losses(model, batch["input_ids"], batch["labels"], exit_layer=2)
    torch.testing.assert_close(approx, again, rtol=0, atol=0)  # dropout is off while scoring
    model.eval()
    with torch.no_grad():
        exact = _exact_per_sample(model, batch)
    torch.testing.assert_close(approx, exact, rtol=1e-6, atol=1e-6)
    early, _ = exit_layer_losses(model, batch["input_ids"], batch["labels"], exit_layer=1)
    assert not torch.allclose(early, exact)  # exit 1 is an approximation


def test_sift_mask_ranks_by_the_mask_positions_and_keeps_whole_samples(tiny_data):
    from pipeline.config import SelectConfig
    from pipeline.sift.hook import Selector

    manifest, batch = _batch(tiny_data)
    mask_id = manifest.special_ids["mask"]
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), manifest.vocab_size, manifest.seq_len)
    model.eval()
    at_mask = labels_at_mask_tokens(batch["input_ids"], batch["labels"], mask_id)
    assert (at_mask >= 0).sum() < (batch["labels"] >= 0).sum()  # the batch has kept/replaced positions
    with torch.no_grad():
        expected = topk_keep(_exact_per_sample(model, {**batch, "labels": at_mask}), 8)
    selector = Selector(SelectConfig(policy="sift_mask", exit_layer=2, oversample=2), micro_batch=8, exit_layer=2,
                        num_layers=2, vocab_size=manifest.vocab_size, max_steps=10, seed=0, rank=0, mask_id=mask_id)
    kept, _ = selector.select(model, batch, step=1)
    assert kept["keys"] == [batch["keys"][i] for i in expected.tolist()]
    torch.testing.assert_close(kept["labels"], batch["labels"][expected])  # trained on every labelled position


def test_training_on_the_kept_samples_equals_masking_out_the_dropped(tiny_data):
    manifest, batch = _batch(tiny_data)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", dropout=0.0), manifest.vocab_size, manifest.seq_len)
    loss, count = exit_layer_losses(model, batch["input_ids"], batch["labels"], exit_layer=1)
    keep = topk_keep(loss, 8)

    model.zero_grad()
    model(batch["input_ids"][keep], batch["labels"][keep]).loss.backward()
    kept_grads = [p.grad.clone() for p in model.parameters()]

    masked_labels = batch["labels"].clone()
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[keep] = False
    masked_labels[dropped] = -100  # the 0/1 loss mask over the full candidate batch
    model.zero_grad()
    model(batch["input_ids"], masked_labels).loss.backward()
    for kept, full in zip(kept_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)


def _kept_and_losses(out_dir: Path) -> tuple[list[list[str]], list[float]]:
    kept = [json.loads(line)["kept"] for line in (out_dir / "keys" / "rank00000.jsonl").read_text().splitlines()]
    losses = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return kept, [r["value"] for r in losses if r["key"] == "train/loss"]


def test_zero3_scores_selects_and_trains_like_zero0(tiny_data, tmp_path, dist_info):
    from pipeline.train import train

    results = {}
    for stage in (0, 3):
        ds = "[ds_configs/base.json" + (", ds_configs/zero3.json, tests/ds_configs/zero3_partition_all.json]" if stage else "]")
        cfg = tiny_config(tiny_data, tmp_path / f"z{stage}", "select.policy=sift", "train.max_steps=5",
                          f"train.ds_configs={ds}", "train.record_keys=true", "train.export=false")
        train(cfg, dist_info)
        results[stage] = _kept_and_losses(tmp_path / f"z{stage}")
    (kept0, loss0), (kept3, loss3) = results[0], results[3]
    assert kept0 == kept3
    assert loss0 == pytest.approx(loss3, abs=1e-5)


def _shard_of_each_key(manifest: Manifest) -> dict[str, str]:
    owner = {}
    for shard in manifest.shards("train"):
        with tarfile.open(manifest.url(shard)) as tar:
            for name in tar.getnames():
                owner[name.split(".")[0]] = shard["name"]
    return owner


@pytest.mark.multiprocess
def test_two_ranks_zero2_select_from_their_own_shards(tiny_data, tmp_path):
    out = tmp_path / "two"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pipeline.train",
           "--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.dir={tiny_data}",
           "--set", f"train.out_dir={out}", "--set", f"tracking.uri=sqlite:///{out}/mlflow.db",
           "--set", "select.policy=sift", "--set", "train.max_steps=6", "--set", "train.record_keys=true",
           "--set", "train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json]"]
    result = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=180,
                            executable=str(Path(sys.executable).with_name("torchrun")))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = Manifest.load(str(tiny_data))
    owner = _shard_of_each_key(manifest)
    kept_by_rank = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in (out / "keys" / f"rank{rank:05d}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(6))
        own = {s["name"] for s in rank_shards(manifest, 0, 0, rank, 2)[rank]}
        kept_by_rank[rank] = {key for r in records for key in r["kept"]}
        assert {owner[key] for r in records for key in r["candidates"]} <= own
    assert not kept_by_rank[0] & kept_by_rank[1]  # disjoint data per rank
