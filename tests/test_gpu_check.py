"""`make gpu-check`: its CPU dry run end to end (slow, in CI through `make test-slow`), and its table
from a made-up GPU result, so that the figures only a GPU gives are shown where they exist and n/a
where they do not.

Checked to fail: with exit_vs_exact comparing against the exit-1 scores instead of the last layer's,
the dry run's ZeRO-3 row read FAILED and the test went red.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, clean_env

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check_report as report  # noqa: E402


def arm(selects: bool, mfu: float | None) -> dict:
    metrics = {"time/step_s": 0.2, "throughput/samples_per_s": 640.0, "throughput/seen_samples_per_s": 1280.0,
               "throughput/tokens_per_s": 81920.0, "throughput/seen_tokens_per_s": 163840.0,
               "throughput/tflops": 300.0, "select/scoring_share": 0.07 if selects else 0.0}
    if mfu is not None:
        metrics.update({"throughput/mfu": mfu, "throughput/mfu_backprop": mfu * 0.9})
    return {"steps": 300, "metrics": metrics, "pieces": {}, "attention": "sdpa", "static_shapes": True,
            "flops_per_step": 1.1e13 if selects else 1e13, "peak_tflops": 989.0 if mfu is not None else None,
            "model_step_s": 0.19, "model_scoring_s": 0.013 if selects else 0.0, "peak_memory_gib": 30.5,
            "host_syncs": {"project": 1, "deepspeed": 2, "other": 0, "where": {}}}


def result(gpu: bool) -> dict:
    mfu = 0.3 if gpu else None
    return {"dry_run": not gpu, "data": "synthetic", "study_data": "data/study-s64-v4096", "wall_s": 400.0,
            "plan": {"arm_config": "configs/base.yaml", "arm_sets": ["train.micro_batch=128",
                                                                     "train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json]"],
                     "arm_seconds": 60.0, "warmup_steps": 5},
            "environment": {"python": "3.11", "torch": "2.13.0", "cuda": "12.8" if gpu else None,
                            "nccl": "2.27.3" if gpu else None, "deepspeed": "0.19.8", "transformers": "5.24.0",
                            "device": "NVIDIA H200" if gpu else "cpu", "gpu_memory_gib": 139.8 if gpu else None,
                            "deepspeed_ops": ["fused_adam"], "sdpa_backends": ["flash"] if gpu else None},
            "arms": {"vanilla": arm(False, mfu), "sift@1": arm(True, mfu)},
            "zero3": {"steps": 3, "losses": [10.4, 10.3, 10.2], "finite": True, "max_abs_diff": 0.0,
                      "tolerance": 0.02, "ok": True},
            "study": {"seconds_to_2x": 41.0 if gpu else None, "max_seconds": 120.0, "steps": 900,
                      "mask_accuracy": 0.3, "reference": 0.12, "micro_batch": 256, "wall_s": 150.0}}


def test_the_table_shows_gpu_figures_where_they_exist_and_na_elsewhere():
    gpu = dict(report.rows(result(gpu=True)))
    assert gpu["torch / CUDA / NCCL"] == "2.13.0 / 12.8 / 2.27.3"
    assert gpu["sift@1: MFU / MFU backprop"] == "30.0% / 27.0%"
    assert gpu["sift@1 / vanilla: step time (FLOPs)"] == "1.00x (1.10x)"
    assert gpu["study recipe: seconds to [MASK] accuracy >= 2x reference"].startswith("41 s")
    cpu = dict(report.rows(result(gpu=False)))
    assert cpu["torch / CUDA / NCCL"] == "2.13.0 / n/a / n/a"
    assert cpu["vanilla: MFU / MFU backprop"] == "n/a / n/a (peak unknown)"
    assert cpu["study recipe: seconds to [MASK] accuracy >= 2x reference"].startswith("not reached in 120 s")
    table = report.table(report.rows(result(gpu=False))).splitlines()
    assert table[0].startswith("| check") and all(line.startswith("|") and line.endswith("|") for line in table)
    assert report.failures(result(gpu=True)) == []


@pytest.mark.slow
def test_the_dry_run_prints_the_table_and_writes_gpu_check_json(tmp_path):
    env = {k: v for k, v in clean_env(PY=sys.executable).items() if k != "DS_ACCELERATOR"}
    start = time.perf_counter()
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = dict(report.rows(saved))
    for row in rows:
        assert f"| {row}" in done.stdout  # the printed table is the saved result's
    assert saved["dry_run"] and saved["device"] == "cpu" and saved["zero3"]["ok"]
    assert rows["device / GPU memory GiB"] == "cpu / n/a" and rows["vanilla: peak GPU memory GiB"] == "n/a"
    assert rows["sift@1: MFU / MFU backprop"].startswith("n/a / n/a")
    for name in ("vanilla", "sift@1"):
        metrics = saved["arms"][name]["metrics"]
        assert saved["arms"][name]["steps"] > 0 and metrics["throughput/tflops"] > 0
    sift = saved["arms"]["sift@1"]["metrics"]
    assert sift["throughput/seen_samples_per_s"] == pytest.approx(2 * sift["throughput/samples_per_s"])
    assert saved["study"]["steps"] > 0 and saved["study"]["reference"] is not None
    assert wall < 240, f"the dry run took {wall:.0f} s; it should stay under 3 minutes on 2 cores"
