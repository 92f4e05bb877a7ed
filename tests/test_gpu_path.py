"""The CUDA path, checked on the CPU: what a GPU user would hit first (docs/GPU.md).

- Asking for GPUs on a machine where none is usable stops the run with exit 2 and a line that says
  why, instead of training on the CPU with gloo without a word.
- The export writes the fp32 master weights, not the 16-bit working copies a bf16 run holds.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.distributed import DeviceError, choose_device
from tests.conftest import REPO, clean_env, tiny_config

CPU_ONLY = not torch.cuda.is_available()


@pytest.mark.skipif(not CPU_ONLY, reason="checks the machine without a usable GPU")
@pytest.mark.parametrize("requested,env", [
    ("auto", {"CUDA_VISIBLE_DEVICES": "0,1"}),  # the deepspeed launcher or a scheduler handed us GPUs
    ("auto", {"SLURM_JOB_GPUS": "0"}),
    ("auto", {"DS_ACCELERATOR": "cuda"}),
    ("cuda", {}),
])
def test_gpus_asked_for_and_none_usable_is_an_error(requested, env):
    """Checked to fail: with the check removed, choose_device returned "cpu" for each of these."""
    with pytest.raises(DeviceError, match=r"GPUs were asked for .* but none is usable .*\(train.device\)"):
        choose_device(requested, env)


@pytest.mark.skipif(not CPU_ONLY, reason="checks the machine without a usable GPU")
@pytest.mark.parametrize("requested,env", [
    ("auto", {}), ("auto", {"CUDA_VISIBLE_DEVICES": ""}), ("cpu", {"CUDA_VISIBLE_DEVICES": "0"}),
    ("auto", {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0,1"}),  # the deepspeed launcher on CPU
])
def test_cpu_when_no_gpu_was_asked_for(requested, env):
    assert choose_device(requested, env) == "cpu"


@pytest.mark.skipif(not CPU_ONLY, reason="checks the machine without a usable GPU")
def test_the_trainer_refuses_gpus_it_cannot_use_with_exit_2(tiny_data, tmp_path):
    env = {k: v for k, v in clean_env().items() if k != "DS_ACCELERATOR"}
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(REPO / "configs/tiny.yaml"),
           "--set", f"data.dir={tiny_data}", "--set", f"train.out_dir={tmp_path}/out"]
    result = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": "0"}, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: GPUs were asked for (CUDA_VISIBLE_DEVICES=0)") and "train.device=cpu" in last
    assert not (tmp_path / "out").exists()  # nothing started


def test_export_writes_the_fp32_masters_of_a_bf16_run(tiny_data, tmp_path, dist_info):
    """ZeRO-2 bf16: the module holds bf16 copies; the exported weights are the optimizer's fp32
    masters. Checked to fail with the old export (module.state_dict() cast to float)."""
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    from pipeline.run import Run
    from pipeline.train import train

    ds = "[ds_configs/base.json, ds_configs/zero2.json, ds_configs/bf16.json]"
    cfg = tiny_config(tiny_data, tmp_path, f"train.ds_configs={ds}", "train.max_steps=3", "tracking.enabled=false")
    train(cfg, dist_info)
    exported = load_file(tmp_path / "export" / "model.safetensors")
    run = Run.open(cfg, dist_info)  # the final checkpoint, resumed into a fresh engine
    name = "bert.encoder.layer.0.attention.self.query.weight"
    param = dict(run.engine.module.mlm.named_parameters())[name]
    assert param.dtype == torch.bfloat16
    master = safe_get_full_fp32_param(param).float().cpu()
    assert torch.equal(exported[name], master)
    assert not torch.equal(exported[name], param.detach().float())  # the bf16 copy is not what was written
    run.close("FINISHED")


# -- the host syncs a GPU step would wait for ----------------------------------------------------------

@pytest.mark.parametrize("policy", ["vanilla", "sift", "random", "exact"])
def test_one_host_sync_per_optimizer_step_at_static_shapes(tiny_data, tmp_path, dist_info, policy):
    """Counted by pipeline.syncs (the ops that make a host wait on a GPU: .item(), .tolist(), nonzero,
    boolean indexing, bincount...): the project's code waits once per optimizer step, the finite check
    (train.grad_accum=1, no probe, no log window). Before: vanilla 10 and sift 27 per step."""
    from pipeline.run import Run
    from pipeline.step import train_step
    from pipeline.syncs import SyncCounter

    cfg = tiny_config(tiny_data, tmp_path, f"select.policy={policy}", "tracking.enabled=false", "select.probe_every=0")
    run = Run.open(cfg, dist_info)
    try:
        train_step(run.engine, run.selector, run.batches, run.progress, dist_info, cfg.train, capacity_prob=0.15)
        with SyncCounter() as syncs:
            for _ in range(3):
                train_step(run.engine, run.selector, run.batches, run.progress, dist_info, cfg.train,
                           capacity_prob=0.15)
    finally:
        run.close("FINISHED")
    assert syncs.project == 3, dict(syncs.where)
    assert set(syncs.where) == {next(iter(syncs.where))} and "guards.py" in next(iter(syncs.where))


def test_static_head_gives_the_exact_losses(tiny_data):
    """The head at a fixed number of positions (padding ignored) computes what the exact head does."""
    from pipeline.config import ModelConfig
    from pipeline.data import eval_batches
    from pipeline.manifest import Manifest
    from pipeline.masking import head_capacity, mask_spec
    from pipeline.model import build_model
    from pipeline.sift.scoring import exit_layer_losses

    manifest = Manifest.load(str(tiny_data))
    batch = eval_batches(manifest, mask_spec(tiny_config(tiny_data, tiny_data).data, manifest), samples=16,
                         batch=16, rank=0, world=1)[0]
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), manifest.vocab_size, manifest.seq_len, manifest.special_ids).eval()
    ids, labels = batch["input_ids"], batch["labels"]
    capacity = head_capacity(16, manifest.seq_len, 0.15)
    assert capacity > int((labels != -100).sum())
    with torch.no_grad():
        exact, static = model(ids, labels), model(ids, labels, capacity=capacity)
    torch.testing.assert_close(static.loss, exact.loss, rtol=1e-6, atol=1e-6)
    n = exact.logits.shape[0]
    torch.testing.assert_close(static.logits[:n], exact.logits, rtol=1e-6, atol=1e-6)
    assert (static.targets[n:] == -100).all() and static.logits.shape[0] == capacity
    for k in (1, 2):
        a, count_a = exit_layer_losses(model, ids, labels, k)
        b, count_b = exit_layer_losses(model, ids, labels, k, capacity)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert torch.equal(count_a, count_b)


def test_the_selector_scores_where_the_model_lies(tiny_data):
    """Model and candidates on the `meta` device: scoring, selection and the kept batch stay there
    (a CPU tensor pulled in would raise). On CUDA, today's code fed the loader's CPU batch to the model."""
    from pipeline.config import SelectConfig
    from pipeline.model import build_model
    from pipeline.config import ModelConfig
    from pipeline.sift.hook import Selector

    model = build_model(ModelConfig(preset="tiny"), 120, 32).to("meta")
    ids = torch.randint(5, 120, (16, 32)).to("meta")
    labels = torch.full((16, 32), -100).to("meta")
    for policy, exit_layer in (("sift", 1), ("exact", 2), ("sift_mask", 1)):
        selector = Selector(SelectConfig(policy=policy, exit_layer=1), micro_batch=8, exit_layer=exit_layer,
                            num_layers=2, vocab_size=120, max_steps=10, seed=0, rank=0, mask_id=4)
        selector.capacity_prob = 0.15
        kept, stats = selector.select(model, {"input_ids": ids, "labels": labels, "keys": []}, 0, with_keys=False)
        assert kept["input_ids"].device.type == kept["labels"].device.type == "meta" and kept["labels"].shape == (8, 32)
        assert stats.kept_loss.device.type == "meta"


def test_train_step_hands_the_selector_candidates_on_the_engines_device(tiny_data, tmp_path, dist_info, monkeypatch):
    """Checked to fail with the move to the device taken out of train_step (the BREAKS item)."""
    from pipeline.distributed import DistInfo
    from pipeline.run import Run
    from pipeline.sift.hook import Selector
    from pipeline.step import train_step

    seen = []

    class Stop(Exception):
        pass

    def recording_select(self, model, batch, step, fraction=None, with_keys=True):
        seen.append(batch["input_ids"].device.type)
        raise Stop

    cfg = tiny_config(tiny_data, tmp_path, "select.policy=sift", "tracking.enabled=false")
    run = Run.open(cfg, dist_info)
    monkeypatch.setattr(Selector, "select", recording_select)
    meta = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
    with pytest.raises(Stop):
        train_step(run.engine, run.selector, run.batches, run.progress, meta, cfg.train)
    run.close("FINISHED")
    assert seen == ["meta"]


def test_a_run_at_static_shapes_trains_as_the_exact_head_does(tiny_data, tmp_path, dist_info):
    """train.static_shapes=true on the CPU (on CUDA it is the default): the same per-micro-step losses
    as the exact head, to float rounding, and the same kept samples."""
    from pipeline.train import train

    results = {}
    for static in ("false", "true"):
        out = tmp_path / static
        train(tiny_config(tiny_data, out, "select.policy=sift", "train.max_steps=4", "train.export=false",
                          "train.record_keys=true", "tracking.enabled=false", f"train.static_shapes={static}"),
              dist_info)
        records = [json.loads(line) for line in (out / "keys" / "rank00000.jsonl").open()]
        results[static] = ([r["kept"] for r in records], [r["loss"] for r in records])
    assert results["true"][0] == results["false"][0]
    assert results["true"][1] == pytest.approx(results["false"][1], rel=1e-5)
