"""Launchers and launch scripts: the deepspeed CLI on two CPU ranks; what a multi-rank or multi-job
start needs from the trainer (a signal during start-up, a rank failing alone, ranks probing one
out_dir, runs creating one sqlite MLflow store); the scripts' syntax (bash -n, shellcheck) and the
sweep's index plan. The Slurm scripts themselves run on a real cluster in tests/test_slurm.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env, free_port

SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/*.sh"), *REPO.glob("scripts/*.sh")])
BIN = Path(sys.executable).parent

# Runs pipeline.train.main with a fault injected where the run is built (test-only; production
# code has no hook): LAUNCH_FAULT=fail_rank1 raises on rank 1 only, signal_at_start sends this
# process SIGUSR1 while the run starts up.
ENTRY = """
import os, signal, sys
from pipeline import run, train

open_run = run.Run.open

def faulty_open(cfg, info):
    if os.environ["LAUNCH_FAULT"] == "fail_rank1" and info.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    if os.environ["LAUNCH_FAULT"] == "signal_at_start":
        os.kill(os.getpid(), signal.SIGUSR1)
    return open_run(cfg, info)

run.Run.open = staticmethod(faulty_open)
sys.exit(train.main())
"""


def train_args(data: Path, out: Path, *overrides: str) -> list[str]:
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.dir={data}", "--set", f"train.out_dir={out}",
            "--set", f"tracking.uri=sqlite:///{out}/mlflow.db", "--set", "train.export=false"]
    for item in overrides:
        args += ["--set", item]
    return args


def test_every_script_passes_bash_n():
    assert SCRIPTS, "no scripts found"
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="needs shellcheck (apt-get install -y --no-install-recommends shellcheck)")
def test_every_script_is_shellcheck_clean():
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]


def test_sweep_lists_index_to_policy_exit_layer_and_seed_outside_slurm():
    env = clean_env(RUNS="vanilla sift:1 sift:3", SEEDS="0 7")
    env.pop("SLURM_ARRAY_TASK_ID", None)
    result = subprocess.run(["bash", str(REPO / "slurm/sweep.sbatch")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "submit with: sbatch --array=0-5 slurm/sweep.sbatch"
    assert lines[1:] == ["0 vanilla-s0", "1 sift@1-s0", "2 sift@3-s0", "3 vanilla-s7", "4 sift@1-s7", "5 sift@3-s7"]


def _probe_out_dir(path: str, start) -> None:
    from pipeline.run import _writable_dir

    start.wait()
    failures = 0
    for _ in range(1000):
        try:
            _writable_dir(Path(path))
        except Exception:  # noqa: BLE001 - counted
            failures += 1
    sys.exit(min(failures, 100))


def test_ranks_checking_one_out_dir_at_once_never_fail(tmp_path):
    """Each rank probes out_dir at start; a shared probe file used to make one rank fail now and then."""
    import pipeline.run  # noqa: F401 - imported once, before the fork

    assert _race(_probe_out_dir, [(str(tmp_path / "out"),)] * 2, timeout=60) == [0, 0]


def _start_and_close_a_run(index: int, uri: str, root: str, start) -> None:
    from pipeline.config import TrackingConfig
    from pipeline.tracking import start_tracker

    start.wait()
    cfg = TrackingConfig(uri=uri, experiment="sweep", retry_seconds=1.0)
    start_tracker(cfg, f"{root}/run{index}", rank=0, run_name=f"run{index}").close()


def test_runs_starting_at_once_share_a_new_sqlite_store(tmp_path):
    """A sweep's array tasks start together on one new mlflow.db: each used to migrate the schema."""
    from mlflow.tracking import MlflowClient

    import pipeline.tracking  # noqa: F401 - imported once, before the fork

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert _race(_start_and_close_a_run, [(i, uri, str(tmp_path)) for i in range(3)], timeout=120) == [0, 0, 0]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]


def test_a_signal_during_start_up_stops_the_run_after_its_first_step(tiny_data, tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(entry), *train_args(tiny_data, out)], capture_output=True, text=True,
                            env=clean_env(LAUNCH_FAULT="signal_at_start"), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopping at step 1: signal" in result.stderr
    assert (out / "checkpoints" / "step00000001" / "COMPLETE").is_file()
    assert json.loads((out / "mlflow_run.json").read_text())["status"] == "KILLED"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_that_fails_alone_ends_the_launch_with_its_traceback(tiny_data, tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "--shutdown-timeout", "5",
           str(entry), *train_args(tiny_data, tmp_path / "run")]
    result = subprocess.run(cmd, env=clean_env(LAUNCH_FAULT="fail_rank1"), capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in result.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_cli_runs_two_cpu_ranks_to_completion(tiny_data, tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()),
           "--module", "pipeline.train", *train_args(tiny_data, out, "train.max_steps=4")]
    result = subprocess.run(cmd, env=clean_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (out / "checkpoints" / "step00000004" / "COMPLETE").is_file()
    config = json.loads((out / "ds_config.json").read_text())
    assert config["train_batch_size"] == 2 * 8  # two ranks of micro-batch 8: both joined one group
    assert (result.stdout + result.stderr).count("exits successfully") == 2  # the launcher's word for each rank


def _race(target, arg_tuples: list[tuple], timeout: float) -> list[int | None]:
    """Fork one process per argument tuple, release them together, return their exit codes."""
    ctx = get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=target, args=(*args, start)) for args in arg_tuples]
    for proc in procs:
        proc.start()
    time.sleep(0.5)
    start.set()
    for proc in procs:
        proc.join(timeout=timeout)
    return [proc.exitcode for proc in procs]
