"""The training engine on the tiny preset: ZeRO stages, MLflow contents, export (resume: tests/test_resume.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import tiny_config
from tests.fault_helpers import journal


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_a_few_steps(tiny_data, tmp_path, dist_info, stage):
    from pipeline.train import train

    ds = ["ds_configs/base.json"] + ([f"ds_configs/zero{stage}.json"] if stage else []) \
        + (["tests/ds_configs/zero3_partition_all.json"] if stage == 3 else [])  # tiny weights: gather them all
    cfg = tiny_config(tiny_data, tmp_path, f"train.ds_configs=[{', '.join(ds)}]", "train.max_steps=4",
                      "train.export=false", "select.policy=sift")  # exit-layer scoring under every stage
    metrics = train(cfg, dist_info)
    losses = journal(tmp_path, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for vs in losses.values() for v in vs)
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and math.isfinite(metrics["eval/loss"])
    assert 0.0 <= metrics["eval/mask_accuracy"] <= 1.0 and math.isfinite(metrics["eval/mask_loss"])


def test_mlflow_run_holds_params_metrics_and_artifacts(tiny_data, tmp_path, dist_info):
    from mlflow.tracking import MlflowClient

    from pipeline.train import train

    cfg = tiny_config(tiny_data, tmp_path, "select.policy=sift", "train.max_steps=4", "train.export=false")
    train(cfg, dist_info)
    run_id = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.params["select.policy"] == "sift" and run.data.params["train.micro_batch"] == "8"
    assert run.data.params["derived.train_batch_size"] == "8"
    assert run.data.tags["policy"] == "sift" and run.data.tags["preset"] == "tiny"
    assert len(run.data.tags["git_commit"]) >= 7 and run.data.tags["sift.kind"] == "train"
    for key in ("train/loss", "train/lr", "train/grad_norm", "throughput/samples_per_s", "throughput/tokens_per_s",
                "progress/samples_seen", "progress/samples_backpropagated", "progress/wall_clock_s",
                "eval/loss", "eval/accuracy", "select/kept_loss", "select/dropped_loss", "time/scoring_s",
                "probe/spearman", "probe/topk_overlap"):
        assert key in run.data.metrics, key
    seen = [m.value for m in client.get_metric_history(run_id, "progress/samples_seen")]
    backprop = [m.value for m in client.get_metric_history(run_id, "progress/samples_backpropagated")]
    assert seen[-1] == 2 * backprop[-1] == 2 * 8 * 4  # oversample 2: twice the samples seen as trained
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "ds_config.json", "manifest.json"} <= artifacts
    assert run.data.metrics["select/kept_loss"] >= run.data.metrics["select/dropped_loss"]


def test_export_loads_and_gives_the_engines_logits(tiny_data, tmp_path, dist_info):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pipeline.data import eval_batches
    from pipeline.manifest import Manifest
    from pipeline.run import Run
    from pipeline.train import train

    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=3")
    train(cfg, dist_info)
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    manifest = Manifest.load(str(tiny_data))
    assert len(tokenizer) == manifest.vocab_size
    run = Run.open(cfg, dist_info)  # resumes the final checkpoint into a fresh engine
    assert run.progress.step == 3
    batch = eval_batches(manifest, run.spec, samples=8, batch=8, rank=0, world=1)[0]
    run.engine.eval()
    with torch.no_grad():
        engine_logits = run.engine(batch["input_ids"], batch["labels"]).logits
        masked = batch["labels"] != -100
        hf_logits = exported(input_ids=batch["input_ids"]).logits[masked]
    torch.testing.assert_close(hf_logits, engine_logits, rtol=1e-5, atol=1e-5)
    run.tracker.close()


def test_eval_every_s_evaluates_by_training_time(tiny_data, tmp_path, dist_info):
    from pipeline.train import train

    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=12", "train.eval_every=1000", "train.eval_every_s=0.05",
                      "train.export=false", "select.policy=sift")
    train(cfg, dist_info)
    times = [values[-1] for _, values in sorted(journal(tmp_path, "eval/train_time_s").items())]
    assert len(times) >= 3  # by time, not only the final eval at max_steps
    assert all(later - earlier >= 0.05 for earlier, later in zip(times[:-2], times[1:-1]))
