"""Numerical faults and checkpoint faults, in-process on the tiny preset.

A NaN/inf loss (injected by patching the model's forward at chosen micro-steps) skips that
micro-step, is counted in train/nonfinite_skipped, and too many in a row stop the run with a clear
message while the checkpoint before stays intact and resumable. A half-written checkpoint (no
COMPLETE marker) is deleted on the next start and never resumed from.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.model import SparseMaskedLM
from tests.conftest import tiny_config
from tests.fault_helpers import journal


def poison_forward(monkeypatch, bad_calls, value: float) -> list[int]:
    """Training forwards number 0, 1, 2, ...; those in `bad_calls` return loss * value (nan/inf)."""
    calls: list[int] = []
    forward = SparseMaskedLM.forward

    def patched(self, input_ids, labels, capacity=None):
        out = forward(self, input_ids, labels, capacity)
        if not self.training:
            return out  # evaluation is left alone
        calls.append(len(calls))
        return out._replace(loss=out.loss * value) if calls[-1] in bad_calls else out

    monkeypatch.setattr(SparseMaskedLM, "forward", patched)
    return calls


def tree_sha(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nonfinite_loss_skips_the_micro_step_and_is_counted(tiny_data, tmp_path, dist_info, monkeypatch, value):
    from mlflow.tracking import MlflowClient

    from pipeline.train import train

    calls = poison_forward(monkeypatch, {2, 5}, value)
    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=6", "train.export=false", "train.max_nonfinite_in_a_row=2")
    train(cfg, dist_info)
    assert len(calls) == 8  # 6 steps + 2 skipped micro-steps
    losses = journal(tmp_path, "train/loss")
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(v[0]) for v in losses.values())
    assert journal(tmp_path, "train/nonfinite_skipped")[6] == [2.0]
    assert journal(tmp_path, "train/nonfinite_skipped")[2] == [0.0]  # counted when it happens
    assert journal(tmp_path, "train/nonfinite_skipped")[3] == [1.0]
    assert journal(tmp_path, "progress/samples_backpropagated")[6] == [6 * 8.0]  # skipped: not backpropagated
    assert journal(tmp_path, "progress/samples_seen")[6] == [8 * 8.0]  # ... but drawn
    run_id = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(run_id).data.metrics["train/nonfinite_skipped"] == 2.0


def test_nonfinite_losses_in_a_row_stop_the_run_and_the_checkpoint_before_stays_intact(
        tiny_data, tmp_path, dist_info, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.train import train

    saved: dict[int, dict[str, str]] = {}
    save = checkpoint.save

    def save_and_hash(engine, ckpt_dir, step, *args, **kwargs):
        path = save(engine, ckpt_dir, step, *args, **kwargs)
        saved[step] = tree_sha(path)
        return path

    monkeypatch.setattr(checkpoint, "save", save_and_hash)
    poison_forward(monkeypatch, set(range(4, 100)), math.nan)  # every micro-step from step 5 on
    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=10", "train.ckpt_every=2", "train.export=false",
                      "train.max_nonfinite_in_a_row=3")
    with pytest.raises(FloatingPointError, match=r"3 non-finite losses in a row at step 4, run stopped "
                                                 r"\(train.max_nonfinite_in_a_row\): the newest complete checkpoint is intact"):
        train(cfg, dist_info)
    ckpt_dir = tmp_path / "checkpoints"
    assert checkpoint.complete_tags(ckpt_dir) == ["step00000002", "step00000004"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step00000002", "step00000004"]  # nothing half-written
    assert tree_sha(ckpt_dir / "step00000004") == saved[4]  # byte for byte what was saved
    run_id = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "FAILED"

    monkeypatch.undo()  # the fault is gone: the run resumes from step 4 and finishes
    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.export=false")
    train(cfg, dist_info)
    assert sorted(journal(tmp_path, "train/loss")) == list(range(1, 7))
    assert all(len(v) == 1 for v in journal(tmp_path, "train/loss").values())  # resumed at 4, nothing re-run


def test_a_half_written_checkpoint_is_deleted_and_never_resumed(tiny_data, tmp_path, dist_info, caplog):
    from pipeline.run import Run
    from pipeline.train import train

    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.export=false")
    train(cfg, dist_info)
    ckpt_dir = tmp_path / "checkpoints"
    half = ckpt_dir / "step00000006"  # what a crash inside save leaves: files, no marker
    shutil.copytree(ckpt_dir / "step00000004", half)
    (half / checkpoint.MARKER).unlink()
    (half / "rank00000_state.pt").unlink()
    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=8", "train.ckpt_every=2", "train.export=false")
    with caplog.at_level("WARNING", logger="pipeline.checkpoint"):
        run = Run.open(cfg, dist_info)
    run.tracker.close()
    assert run.progress.step == 4
    assert not half.exists() and "removing incomplete checkpoint" in caplog.text
