"""data_prep's CLI, its tar writer against tarfile, and a real crash (SIGKILL) and Ctrl-C mid-build."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.shards import iter_tar_samples, ustar_header

REPO = Path(__file__).resolve().parent.parent
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "tu", "ve", "ra", "si", "po") for b in "ntslrm"]


def corpus(path: Path, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + "\n" for _ in range(n)))
    return str(path)


def sha_tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,size", [("train-000000-000000.input_ids.npy", 192),
                                       ("val-00012-000003-999999.input_ids.npy", 10**9 + 7)])
def test_tar_header_equals_tarfile(name, size):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = size, 0o444, 0, "sift", "sift"
    assert ustar_header(name, size) == ti.tobuf(format=tarfile.USTAR_FORMAT)


def test_cli_build_tokenizer_parts_merge_inspect(tmp_path, capsys):
    files = [corpus(tmp_path / f"c{i}.txt", 80, seed=i) for i in range(3)]
    assert main(["-q", "build", "--input", str(tmp_path / "c*.txt"), "--out", str(tmp_path / "one"),
                 "--seq-len", "24", "--vocab-size", "90", "--samples-per-shard", "16", "--no-progress"]) == 0
    assert "train:" in capsys.readouterr().out
    assert main(["-q", "tokenizer", "-i", *files, "-o", str(tmp_path / "tok"), "--vocab-size", "90"]) == 0
    tok = json.loads(capsys.readouterr().out)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert tok["vocab_sha256"] == one["tokenizer"]["vocab_sha256"]  # the same corpus, the same vocab
    for part in range(2):
        assert main(["-q", "build", "-i", *files, "-o", str(tmp_path / "parts"), "--seq-len", "24",
                     "--tokenizer", str(tmp_path / "tok"), "--samples-per-shard", "16",
                     "--part", str(part), "--parts", "2", "--workers", "2"]) == 0
    assert main(["-q", "merge", str(tmp_path / "parts")]) == 0
    merged = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert merged["splits"] == {**one["splits"],
                                "train": {**one["splits"]["train"], "shards": merged["splits"]["train"]["shards"]},
                                "val": {**one["splits"]["val"], "shards": merged["splits"]["val"]["shards"]}}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "parts"), "--samples", "2", "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- train-0000") == 2 and "[CLS]" in out and "all match the manifest" in out
    (tmp_path / "parts" / "val-00001-000000.tar").unlink()
    assert main(["-q", "inspect", str(tmp_path / "parts"), "--samples", "0", "--verify"]) == 2
    res = capsys.readouterr()
    assert "val-00001-000000.tar: missing" in res.out
    assert res.err.startswith("error: shards differ from the manifest") and res.err.count("\n") == 1
    assert main(["-q", "inspect", str(tmp_path)]) == 2  # not a shard dir: a clear error, no traceback
    assert "(no manifest.json)" in capsys.readouterr().err


def start_until_shards(cmd: list[str], out: Path, n: int, **popen) -> subprocess.Popen:
    """Start a build and return once ``n`` shards are complete, the build still running."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and len([p for p in out.iterdir() if p.suffix == ".tar"]) >= n:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be stopped: use a bigger corpus"
    return proc


def test_sigkill_mid_build_then_rerun_gives_the_clean_result(tmp_path):
    src = corpus(tmp_path / "big.txt", 20_000, seed=5)  # 20 batches: the kill lands mid-build
    tok = tmp_path / "tok"
    small = corpus(tmp_path / "small.txt", 300, seed=6)
    assert main(["-q", "tokenizer", "-i", small, "-o", str(tok), "--vocab-size", "90"]) == 0
    args = ["--input", src, "--seq-len", "32", "--tokenizer", str(tok), "--samples-per-shard", "20",
            "--no-progress"]
    clean = tmp_path / "clean"
    assert main(["-q", "build", *args, "--out", str(clean)]) == 0

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "-q", "build", *args, "--out", str(out)]
    proc = start_until_shards(cmd, out, 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and (out / ".incomplete").exists()
    complete = sorted(p for p in out.iterdir() if p.suffix == ".tar")
    assert complete
    for p in complete:  # a shard under its final name is whole: same bytes as the clean build's
        assert hashlib.sha256(p.read_bytes()).hexdigest() == \
            hashlib.sha256((clean / p.name).read_bytes()).hexdigest()
        assert sum(1 for _ in iter_tar_samples(str(p))) == 20

    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sha_tree(out) == sha_tree(clean)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
def test_ctrl_c_mid_build_exits_130_with_one_line_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, workers included) mid-build: exit 130, one
    stderr line, no traceback from the parent or the worker processes, and the output directory
    is gone, so running the same command again works (what the message says to do)."""
    src = corpus(tmp_path / "big.txt", 20_000, seed=5)
    tok = tmp_path / "tok"
    assert main(["-q", "tokenizer", "-i", corpus(tmp_path / "small.txt", 300, seed=6), "-o", str(tok),
                 "--vocab-size", "90"]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "-q", "build", "-i", src, "-o", str(out), "--seq-len", "32",
           "--tokenizer", str(tok), "--samples-per-shard", "20", "--workers", "2", "--no-progress"]
    proc = start_until_shards(cmd, out, 1, text=True, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert re.fullmatch(r"error: interrupted by Ctrl-C \(python -m data_prep build\): run the same command again.*\n",
                        stderr), stderr
    assert not out.exists()
