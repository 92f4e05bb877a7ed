"""Resume you can trust: a run killed (SIGKILL) or stopped (SIGTERM, Slurm's preemption and time
limit) after a checkpoint, then started again with the same command, ends exactly where an unbroken
run ends. One rank here; two ranks at ZeRO-2 and ZeRO-3 in tests/test_faults_resume.py (slow).

Checked to fail with resume disabled on the restart (--set train.resume=false): the restart trained
steps 1..6 a second time ("step 1 trained twice"); the final weights alone would not have shown it.
"""
from __future__ import annotations

import json
import signal

import pytest

from tests.fault_helpers import assert_resumed_exactly, journal, newest_checkpoint_step, run_ok, signal_when, train_cmd

STEPS = 14
RUN = [f"train.max_steps={STEPS}", "train.ckpt_every=6", "model.dropout=0.1", "train.eval_every=7",
       "train.export=true", "train.record_keys=true"]


@pytest.mark.parametrize("policy", ["vanilla", "sift"])
def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tiny_data, tmp_path, policy):
    run = [*RUN, f"select.policy={policy}"]
    run_ok(train_cmd(tiny_data, tmp_path / "straight", *run))
    out = tmp_path / "killed"
    marker = out / "checkpoints" / "step00000006" / "COMPLETE"
    signal_when(train_cmd(tiny_data, out, *run), marker.exists, signal.SIGKILL, tmp_path / "kill.log")
    resume_step = newest_checkpoint_step(out)
    assert resume_step == 6 and max(journal(out, "train/loss")) < STEPS, "the kill came too late"
    run_ok(train_cmd(tiny_data, out, *run))
    assert_resumed_exactly(tmp_path / "straight", out, resume_step, STEPS)


def test_sigterm_checkpoints_this_step_marks_killed_and_resumes_bit_identically(tiny_data, tmp_path):
    """What Slurm does at preemption and at the time limit. The run checkpoints the step it is in, its
    MLflow run says KILLED, it exits 0 (README: exit codes), and the same command resumes it."""
    from mlflow.tracking import MlflowClient

    run = [*RUN, "select.policy=sift"]
    run_ok(train_cmd(tiny_data, tmp_path / "straight", *run))
    out = tmp_path / "stopped"
    first = out / "checkpoints" / "step00000006" / "COMPLETE"
    code = signal_when(train_cmd(tiny_data, out, *run), first.exists, signal.SIGTERM, tmp_path / "term.log")
    assert code == 0, (tmp_path / "term.log").read_text()[-2000:]
    stopped_at = newest_checkpoint_step(out)
    assert 6 <= stopped_at < STEPS and max(journal(out, "train/loss")) == stopped_at  # this step's checkpoint
    info = json.loads((out / "mlflow_run.json").read_text())
    assert info["status"] == "KILLED"
    assert MlflowClient(f"sqlite:///{out}/mlflow.db").get_run(info["run_id"]).info.status == "KILLED"
    run_ok(train_cmd(tiny_data, out, *run))
    assert_resumed_exactly(tmp_path / "straight", out, stopped_at, STEPS)
    assert MlflowClient(f"sqlite:///{out}/mlflow.db").get_run(info["run_id"]).info.status == "FINISHED"


def test_starting_a_finished_run_again_trains_nothing_and_says_so(tiny_data, tmp_path):
    """It trained one more step before (the loop ran before it looked at the budget)."""
    run = ["train.max_steps=3", "train.export=false", "train.record_keys=true"]
    run_ok(train_cmd(tiny_data, tmp_path, *run))
    before = journal(tmp_path, "train/loss")
    log = run_ok(train_cmd(tiny_data, tmp_path, *run))
    assert "run ended: the run was already complete (step 3 of train.max_steps=3): nothing trained" in log
    assert journal(tmp_path, "train/loss") == before
    assert len((tmp_path / "keys" / "rank00000.jsonl").read_text().splitlines()) == 3
