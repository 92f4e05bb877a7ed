"""Shared fixtures: a tiny corpus sharded once per session by data_prep itself, and run configs."""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent


def write_corpus(path: Path, documents: int = 600, seed: int = 0) -> Path:
    """Made-up English-like documents: Zipf-distributed words, so MLM has something to learn."""
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "tu", "ve", "ra", "si", "po") for b in ("n", "t", "s", "l", "r", "m")]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    lines = []
    for _ in range(documents):
        lines.append(" ".join(rng.choices(words, weights, k=rng.randint(8, 60))))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """~40 train shards of 16 samples (enough for 2 ranks), seq_len 32, a 120-token WordPiece vocab."""
    from data_prep.build import BuildOptions, build_shards

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = write_corpus(root / "corpus.txt")
    out = root / "shards"
    build_shards([str(corpus)], str(out), BuildOptions(seq_len=32, vocab_size=120, val_fraction=0.1, samples_per_shard=16))
    return out


@pytest.fixture(scope="session")
def dist_info():
    from pipeline.distributed import init_distributed

    return init_distributed()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process, without this process's rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def tiny_config(data_dir: Path, out_dir: Path, *overrides: str):
    from pipeline.config import load_config

    base = [f"data.dir={data_dir}", f"train.out_dir={out_dir}", f"tracking.uri=sqlite:///{out_dir}/mlflow.db",
            f"tracking.artifact_location={out_dir}/artifacts"]
    return load_config(str(REPO / "configs" / "tiny.yaml"), base + list(overrides))
