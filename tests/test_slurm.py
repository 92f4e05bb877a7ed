"""slurm/*.sbatch on a real one-node Slurm cluster (localhost, 2 CPUs): data prep as an array job
plus merge, pretraining with two CPU ranks, a sweep into one MLflow experiment, and a preempted job
that checkpoints, requeues itself and resumes where it stopped.

Needs Debian's slurm-wlm and munge and root (skipped with the reason otherwise); CI runs it with
`make test-slurm`."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_corpus
from tests.slurm_cluster import SlurmCluster, missing_reason

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))]
SLURM = REPO / "slurm"
CPU_JOB = ("--gpus-per-node=0", "--time=10")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shards(cluster, tmp_path_factory) -> Path:
    """Two corpus files sharded by slurm/prep_and_merge.sh: tokenizer job, 2-task array, merge."""
    root = tmp_path_factory.mktemp("prep")
    write_corpus(root / "a.txt", 300, seed=1)
    write_corpus(root / "b.txt", 300, seed=2)
    env = cluster.env(REPO_DIR=str(REPO), PYTHON=sys.executable, INPUTS=f"{root}/*.txt", DATA_DIR=f"{root}/shards",
                      PARTS="2", VOCAB_SIZE="120", SEQ_LEN="32", SAMPLES_PER_SHARD="16", VAL_FRACTION="0.1")
    result = cluster.run(str(SLURM / "prep_and_merge.sh"), "--cpus-per-task=1", env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    ids = re.findall(r"job (\d+)", result.stdout)
    assert len(ids) == 3, result.stdout  # tokenizer, build array, merge
    for job_id in ids:
        jobs = cluster.wait(job_id, timeout=180)
        assert {j["JobState"] for j in jobs} == {"COMPLETED"}, cluster.logs(job_id)
    assert len(cluster.jobs(ids[1])) == 2  # the array ran two tasks
    return root / "shards"


def pretrain_env(cluster: SlurmCluster, data: Path, out: Path, **knobs: str) -> dict[str, str]:
    return cluster.env(REPO_DIR=str(REPO), PYTHON=sys.executable, CONFIG="configs/tiny.yaml", DATA_DIR=str(data),
                       OUT_DIR=str(out), MLFLOW_TRACKING_URI=f"sqlite:///{out.parent}/mlflow.db",
                       GPUS_PER_NODE="0", NPROC_PER_NODE="2", **knobs)


def logged_steps(out: Path, key: str = "train/loss") -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [int(r["step"]) for r in map(json.loads, lines) if r.get("key") == key]


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    return MlflowClient(tracking_uri=f"sqlite:///{out.parent}/mlflow.db").get_run(info["run_id"])


def test_prep_array_and_merge_write_one_manifest_over_both_parts(shards):
    from pipeline.manifest import Manifest

    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["parts"]["parts"] == 2
    assert {Path(s["path"]).name for s in manifest["sources"]} == {"a.txt", "b.txt"}
    assert {s["name"].split("-")[1] for s in manifest["shards"]} == {"00000", "00001"}  # both parts' shards
    for shard in manifest["shards"]:
        assert (shards / shard["name"]).stat().st_size == shard["bytes"]
    assert (shards / "tokenizer" / "vocab.txt").is_file()
    assert Manifest.load(str(shards)).split_samples("train") > 100  # the trainer reads it


def test_pretrain_runs_two_cpu_ranks_to_the_end(cluster, shards, tmp_path):
    out = tmp_path / "run"
    env = pretrain_env(cluster, shards, out, SETS="train.max_steps=8 select.policy=sift")
    job = cluster.sbatch(*CPU_JOB, str(SLURM / "pretrain.sbatch"), env=env, cwd=tmp_path)
    (info,) = cluster.wait(job, timeout=240)
    log = cluster.logs(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "1 node(s) x 2 rank(s) on CPU" in log
    assert (out / "checkpoints" / "step00000008" / "COMPLETE").is_file()
    assert (out / "export" / "config.json").is_file()
    run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    assert run.data.params["derived.world_size"] == "2" and run.data.tags["policy"] == "sift"
    assert logged_steps(out) == list(range(1, 9))


def test_preempted_job_checkpoints_requeues_itself_and_resumes(cluster, shards, tmp_path):
    out, max_steps = tmp_path / "run", 400
    sets = f"train.max_steps={max_steps} train.ckpt_every=100 train.eval_every=100 train.log_every=10 train.export=false"
    job = cluster.sbatch(*CPU_JOB, str(SLURM / "pretrain.sbatch"), env=pretrain_env(cluster, shards, out, SETS=sets),
                         cwd=tmp_path)
    first = out / "checkpoints" / "step00000100" / "COMPLETE"
    deadline = time.time() + 180
    while not first.exists():  # training is under way: the ranks have their signal handlers
        assert time.time() < deadline and cluster.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), cluster.logs(job)
        time.sleep(0.2)
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0  # what --signal=B:USR1 does

    # The job requeues itself (same id, Restarts=1), is held for the credential lifetime
    # (CRED_EXPIRE_S here, 120 s by default), starts again and finishes.
    (info,) = cluster.wait(job, timeout=300)
    log = cluster.logs(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{info}\n{log[-4000:]}"

    assert "preemption signal" in log and f"requeueing job {job}" in log and f"job {job} (restart 1)" in log
    stopped = int(re.search(r"stopping at step (\d+): signal", log).group(1))
    assert 100 <= stopped < max_steps, "the run was not cut short"
    resumed = re.findall(r"resumed from \S+step(\d{8}) \(step (\d+)\)", log)
    assert resumed == [(f"{stopped:08d}", str(stopped))], "the requeued job did not resume from the stop checkpoint"
    # Every logged step once (the stop step is logged too): a restart from 0 would log 10..stopped again.
    assert logged_steps(out) == sorted({*range(10, max_steps + 1, 10), stopped})
    assert (out / "checkpoints" / f"step{max_steps:08d}" / "COMPLETE").is_file()
    run = mlflow_run(out)  # one MLflow run across both starts
    assert run.info.status == "FINISHED"
    assert log.count(f"MLflow run {run.info.run_id} (experiment") == 2  # the start line of each start


def test_sweep_fills_one_experiment_with_a_run_per_array_task(cluster, shards, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = cluster.env(REPO_DIR=str(REPO), PYTHON=sys.executable, CONFIG="configs/tiny.yaml", DATA_DIR=str(shards),
                      RUNS="vanilla sift:1", EXPERIMENT="sweep-test", SWEEP_DIR=str(tmp_path / "sweep"),
                      MLFLOW_TRACKING_URI=uri, GPUS_PER_NODE="0", SETS="train.max_steps=4 train.export=false")
    job = cluster.sbatch(*CPU_JOB, "--array=0-1", "--cpus-per-task=1", str(SLURM / "sweep.sbatch"), env=env,
                         cwd=tmp_path)
    tasks = cluster.wait(job, timeout=240)
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 2, cluster.logs(job)[-4000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    assert sorted((r.data.tags["policy"], r.data.tags["exit_layer"], r.info.status) for r in runs) == [
        ("sift", "1", "FINISHED"), ("vanilla", "-", "FINISHED")]  # vanilla scores nothing: no exit layer ran
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["sift@1-s0", "vanilla-s0"]
