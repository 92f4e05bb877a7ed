"""SIGKILL at three random steps, one of them inside a checkpoint write; each time the run is restarted.

The restarted run must end exactly where an uninterrupted run ends (fp32 CPU, dropout on, the random
policy so the selector's generator matters): the same loss at every step, the same final weights,
the same samples in the same steps, no sample twice or skipped within an epoch, and the half-written
checkpoint deleted, never resumed from. Kill points come from a seeded RNG (printed on failure).
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, clean_env
from tests.fault_helpers import build_small_data, journal, run_ok, tar_samples, train_cmd

pytestmark = pytest.mark.slow

STEPS, CKPT_EVERY, SEED = 20, 3, 20240611
RUN = [f"train.max_steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.keep_checkpoints=2", "train.eval_every=5",
       "select.policy=random", "model.dropout=0.1", "train.record_keys=true", "train.export=true"]


def kill_points(seed: int) -> tuple[int, int, int]:
    """(mid-step pause, checkpoint being written, free-running kill), increasing, each after a checkpoint."""
    rng = random.Random(seed)
    in_save = rng.choice(range(3 * CKPT_EVERY, STEPS - CKPT_EVERY, CKPT_EVERY))
    return rng.randint(CKPT_EVERY + 1, in_save - 1), in_save, rng.randint(in_save + 1, STEPS - 2)


def start(data: Path, out: Path, log: Path, **fault_env: str) -> subprocess.Popen:
    cmd = train_cmd(data, out, *RUN, entry="tests.fault_entry")
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(**fault_env), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def wait_for(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "kill point not reached"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def kept_and_candidates(out: Path) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for line in (out / "keys" / "rank00000.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record  # a step re-run after a resume: the last write wins
    return by_step


def test_sigkill_three_times_one_inside_a_checkpoint_write_resumes_exactly(tmp_path):
    data = build_small_data(tmp_path / "data")
    mid_step, in_save, free = kill_points(SEED)
    context = f"kill points (seed {SEED}): mid-step {mid_step}, checkpoint {in_save}, free-running {free}"

    straight = tmp_path / "straight"
    run_ok(train_cmd(data, straight, *RUN))

    out, flag = tmp_path / "killed", tmp_path / "paused"
    proc = start(data, out, tmp_path / "run1.log", FAULT_PAUSE_AT_STEP=str(mid_step), FAULT_FLAG=str(flag))
    wait_for(proc, flag.exists, tmp_path / "run1.log")
    flag.unlink()

    proc = start(data, out, tmp_path / "run2.log", FAULT_PAUSE_IN_SAVE_AT_STEP=str(in_save), FAULT_FLAG=str(flag))
    wait_for(proc, flag.exists, tmp_path / "run2.log")
    half = out / "checkpoints" / f"step{in_save:08d}"
    assert half.is_dir() and any(half.iterdir()) and not (half / "COMPLETE").exists(), context

    proc = start(data, out, tmp_path / "run3.log")
    wait_for(proc, lambda: max(journal(out, "train/loss"), default=0) >= free, tmp_path / "run3.log")
    run3 = (tmp_path / "run3.log").read_text()
    assert f"removing incomplete checkpoint {half}" in run3, context
    assert f"(step {in_save - CKPT_EVERY})" in run3.split("resumed from")[1].splitlines()[0], context

    final_log = run_ok(train_cmd(data, out, *RUN))
    assert "resumed from" in final_log

    # the same loss at every step, including the steps done twice around each kill
    reference = {step: values[0] for step, values in journal(straight, "train/loss").items()}
    resumed = journal(out, "train/loss")
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1)), context
    assert any(len(values) > 1 for values in resumed.values()), "no step was re-run: the kills missed"
    for step, values in resumed.items():
        assert all(value == reference[step] for value in values), (context, step, values, reference[step])

    # the same final weights (the exported HF model) and counters
    a, b = load_file(straight / "export" / "model.safetensors"), load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), context
    tag = f"step{STEPS:08d}"
    final = [torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["progress"]
             for run in (straight, out)]
    for key in ("step", "epoch", "micro_in_epoch", "samples_seen", "samples_backprop"):
        assert final[0][key] == final[1][key], key

    # the same candidates and kept samples at every step; per epoch none twice, none skipped
    ours, theirs = kept_and_candidates(out), kept_and_candidates(straight)
    assert ours == theirs
    train_keys = {key for shard in sorted(data.glob("train-*.tar")) for key, _ in tar_samples(shard)}
    batch = len(ours[0]["candidates"])
    epochs: dict[int, list[str]] = {}
    for step in sorted(ours):
        epochs.setdefault(ours[step]["epoch"], []).extend(ours[step]["candidates"])
    assert len(epochs) >= 2, "the run should cross an epoch boundary"
    for epoch, keys in epochs.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a sample drawn twice"
        assert set(keys) <= train_keys
    for epoch in sorted(epochs)[:-1]:  # complete epochs leave out only the remainder of a micro-batch
        assert 0 <= len(train_keys) - len(epochs[epoch]) < batch, epoch


TWO_RANK_RUN = ["train.max_steps=12", "train.ckpt_every=6", "model.dropout=0.1", "train.eval_every=6",
                "train.export=true", "train.record_keys=true", "select.policy=sift"]


def _zero(stage: int) -> str:
    partition_all = ", tests/ds_configs/zero3_partition_all.json" if stage == 3 else ""  # tiny weights: gather them all
    return f"train.ds_configs=[ds_configs/base.json, ds_configs/zero{stage}.json{partition_all}]"


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_killed_after_a_checkpoint_resume_bit_identically(tiny_data, tmp_path, stage):
    """ZeRO-2 and ZeRO-3, 2 ranks: SIGKILL to the launcher and both ranks right after the step-6
    checkpoint, then the same command: the same losses and final weights as an unbroken run, and
    nothing before the checkpoint trained twice (so a restart from scratch fails here)."""
    from tests.fault_helpers import assert_resumed_exactly, newest_checkpoint_step, signal_when, torchrun_cmd

    run = [*TWO_RANK_RUN, _zero(stage)]
    run_ok(torchrun_cmd(tiny_data, tmp_path / "straight", *run))
    out = tmp_path / "killed"
    marker = out / "checkpoints" / "step00000006" / "COMPLETE"
    signal_when(torchrun_cmd(tiny_data, out, *run), marker.exists, signal.SIGKILL, tmp_path / "kill.log", group=True)
    assert newest_checkpoint_step(out) == 6
    run_ok(torchrun_cmd(tiny_data, out, *run))
    assert_resumed_exactly(tmp_path / "straight", out, 6, 12)


@pytest.mark.multiprocess
def test_two_ranks_stopped_by_sigterm_checkpoint_and_resume_bit_identically(tiny_data, tmp_path):
    """SIGTERM to every process (Slurm's preemption): both ranks checkpoint the step they are in,
    the MLflow run says KILLED, and the same command resumes it exactly."""
    from tests.fault_helpers import assert_resumed_exactly, newest_checkpoint_step, signal_when, torchrun_cmd

    run = [*TWO_RANK_RUN, _zero(2)]
    run_ok(torchrun_cmd(tiny_data, tmp_path / "straight", *run))
    out = tmp_path / "stopped"
    first = out / "checkpoints" / "step00000006" / "COMPLETE"
    signal_when(torchrun_cmd(tiny_data, out, *run), first.exists, signal.SIGTERM, tmp_path / "term.log", group=True)
    stopped_at = newest_checkpoint_step(out)
    assert 6 <= stopped_at < 12 and max(journal(out, "train/loss")) == stopped_at
    assert json.loads((out / "mlflow_run.json").read_text())["status"] == "KILLED"
    run_ok(torchrun_cmd(tiny_data, out, *run))
    assert_resumed_exactly(tmp_path / "straight", out, stopped_at, 12)
