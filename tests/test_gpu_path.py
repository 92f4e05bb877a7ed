"""The CUDA path, checked on the CPU: what a GPU user would hit first (docs/GPU.md).

- Asking for GPUs on a machine where none is usable stops the run with exit 2 and a line that says
  why, instead of training on the CPU with gloo without a word.
- The export writes the fp32 master weights, not the 16-bit working copies a bf16 run holds.
"""
from __future__ import annotations

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
