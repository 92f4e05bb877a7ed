"""Helpers for the fault tests: small shard dirs to damage, hand-made tars, journal readers."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from tests.conftest import REPO, clean_env, write_corpus


def build_small_data(root: Path, documents: int = 120) -> Path:
    """~8 train shards of 16 samples (seq_len 32) and one val shard: an epoch is a few steps."""
    from data_prep.build import BuildOptions, build_shards

    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root / "corpus.txt", documents=documents, seed=3)
    out = root / "shards"
    build_shards([str(corpus)], str(out), BuildOptions(seq_len=32, vocab_size=120, val_fraction=0.1, samples_per_shard=16))
    return out


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())


def write_manifest(data_dir: Path, manifest: dict) -> None:
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def refresh_shard_entry(data_dir: Path, name: str) -> None:
    """Make the manifest's bytes/sha256 of a shard match the file again (a consistent but bad shard)."""
    manifest = read_manifest(data_dir)
    data = (data_dir / name).read_bytes()
    for shard in manifest["shards"]:
        if shard["name"] == name:
            shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    write_manifest(data_dir, manifest)


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tar_samples(path: Path) -> list[tuple[str, np.ndarray]]:
    """(key, ids) of a good shard, read with tarfile directly (independent of the loader)."""
    out = []
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            data = tf.extractfile(member).read()
            out.append((member.name.split(".")[0], np.load(io.BytesIO(data), allow_pickle=False)))
    return out


def journal(out_dir: Path, key: str) -> dict[int, list[float]]:
    """Every value the run journaled for `key`, by step (a step re-run after a resume appears twice)."""
    values: dict[int, list[float]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("key") == key:
            values.setdefault(int(record["step"]), []).append(float(record["value"]))
    return values


def train_cmd(data: Path, out: Path, *overrides: str, entry: str = "pipeline.train") -> list[str]:
    cmd = [sys.executable, "-m", entry, "--config", str(REPO / "configs/tiny.yaml"),
           "--set", f"data.dir={data}", "--set", f"train.out_dir={out}",
           "--set", f"tracking.uri=sqlite:///{out}/mlflow.db", "--set", f"tracking.artifact_location={out}/artifacts"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_ok(cmd: list[str], log: Path | None = None, **env: str) -> str:
    result = subprocess.run(cmd, env=clean_env(**env), capture_output=True, text=True, cwd=REPO, timeout=600)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr + result.stdout  # the logs, then the end-of-run summary


def signal_when(cmd: list[str], ready, sig: int, log: Path, timeout: float = 180, group: bool = False,
                **env: str) -> int:
    """Start `cmd`, send `sig` as soon as ready() holds, return its exit code (stderr to `log`).
    group=True: `cmd` starts its own process group and the signal goes to all of it (a launcher and
    its ranks, as Slurm signals every process of a job step)."""
    import os
    import signal as signals
    import time

    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(**env), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=group)
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"the run ended before the signal point:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "signal point not reached"
            time.sleep(0.005)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        code = proc.wait(timeout=timeout)
    assert group or sig != signals.SIGKILL or code == -signals.SIGKILL
    return code


def torchrun_cmd(data: Path, out: Path, *overrides: str, ranks: int = 2) -> list[str]:
    """train_cmd under torchrun with `ranks` CPU ranks."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks), "--master_port",
                str(port), "--shutdown-timeout", "60"]
    return launcher + train_cmd(data, out, *overrides)[1:]  # train_cmd's "-m pipeline.train ..." after the launcher


def newest_checkpoint_step(out: Path) -> int:
    from pipeline.checkpoint import complete_tags

    tags = complete_tags(out / "checkpoints")
    return int(tags[-1][4:]) if tags else 0


def assert_resumed_exactly(straight: Path, resumed: Path, resume_step: int, steps: int) -> None:
    """The resumed run equals the unbroken one: torch.equal final weights (the fp32 export), the same
    loss at every step, bit for bit; and the steps up to the checkpoint it resumed were trained once
    (a restart from scratch would repeat them and still end with the same weights). Needs
    train.record_keys=true: rank 0's keys file keeps every micro-step, whatever the tracker does."""
    import torch
    from safetensors.torch import load_file

    reference, got = journal(straight, "train/loss"), journal(resumed, "train/loss")
    assert sorted(got) == sorted(reference) == list(range(1, steps + 1))
    for step, values in got.items():
        assert all(value == reference[step][0] for value in values), (step, values, reference[step])
    trained = [json.loads(line)["step"] for line in (resumed / "keys" / "rank00000.jsonl").open()]
    once = [json.loads(line)["step"] for line in (straight / "keys" / "rank00000.jsonl").open()]
    for step in range(resume_step):  # 0-based: the steps before the checkpoint
        assert trained.count(step) == once.count(step), \
            f"step {step + 1} trained twice: the restart did not resume from step {resume_step}"
    a, b = load_file(straight / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
