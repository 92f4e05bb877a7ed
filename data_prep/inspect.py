"""``inspect``: the manifest summary and a few samples decoded to text; with ``verify``, every
shard checked against the manifest (sha256, bytes, sample count, shapes, ids, special tokens, keys)
and every tar member name checked (no ``..``, no absolute paths, plain files only)."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import numpy as np

from .errors import DataPrepError
from .manifest import MANIFEST, read_manifest, summary
from .shards import file_sha256, iter_tar_samples

logger = logging.getLogger(__name__)


def check_output_dir(path: str) -> None:
    """Refuse anything but a directory up front: a file given here (README.md, a shard, the
    manifest itself) is not a damaged manifest, and saying "invalid JSON" sent people looking
    for one."""
    if os.path.isdir(path) or not os.path.exists(path):
        return  # read_manifest names a missing path or manifest.json
    parent = os.path.dirname(os.path.abspath(path))
    fix = (f"pass its directory instead: {parent}" if os.path.basename(path) == MANIFEST
           or os.path.isfile(os.path.join(parent, MANIFEST))
           else "pass the --out directory of a finished `python -m data_prep build`")
    raise DataPrepError("not a data_prep output directory (a file)", where=path, fix=fix)


def verify_shards(shard_dir: str, manifest: dict | None = None) -> list[str]:
    """Problems found in the shard dir (empty when all is well)."""
    m = manifest or read_manifest(shard_dir)
    problems: list[str] = []
    seq_len, vocab = m["seq_len"], m["vocab_size"]
    cls, sep = m["tokenizer"]["special_ids"]["cls"], m["tokenizer"]["special_ids"]["sep"]
    keys: set[str] = set()
    for rec in m["shards"]:
        path = os.path.join(shard_dir, rec["name"])
        if not os.path.isfile(path):
            problems.append(f"{rec['name']}: missing")
            continue
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            problems.append(f"{rec['name']}: {size} bytes, manifest says {rec['bytes']}")
        if file_sha256(path) != rec["sha256"]:
            problems.append(f"{rec['name']}: sha256 differs from the manifest (corrupt or replaced)")
        n = 0
        try:
            for key, ids in iter_tar_samples(path):
                n += 1
                if key in keys:
                    problems.append(f"{rec['name']}: key {key} appears twice in the directory")
                keys.add(key)
                if ids.shape != (seq_len,) or ids.dtype != np.dtype(m["dtype"]):
                    problems.append(f"{rec['name']}: {key} is {ids.dtype}{list(ids.shape)}, "
                                    f"expected {m['dtype']}[{seq_len}]")
                    continue
                if ids[0] != cls or ids[-1] != sep or int(ids.max()) >= vocab:
                    problems.append(f"{rec['name']}: {key} lacks [CLS]/[SEP] or has ids >= {vocab}")
        except DataPrepError as e:
            problems.append(f"{rec['name']}: {e.what}")
            continue
        if n != rec["samples"]:
            problems.append(f"{rec['name']}: {n} samples, manifest says {rec['samples']}")
    listed = {rec["name"] for rec in m["shards"]}
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: a shard file not in the manifest")
    return problems


def inspect_dir(shard_dir: str, *, samples: int = 3, verify: bool = False,
                out: TextIO = sys.stdout) -> bool:
    """Print the summary and ``samples`` decoded samples; returns False when verify found problems."""
    check_output_dir(shard_dir)
    m = read_manifest(shard_dir)
    print(summary(m), file=out)
    tok = None
    try:
        from .tokenizer import load_tokenizer

        info = load_tokenizer(os.path.join(shard_dir, m["tokenizer"]["dir"]))
        if info.vocab_sha256 != m["tokenizer"]["vocab_sha256"]:
            print("WARNING: the tokenizer's vocab differs from the manifest's", file=out)
        tok = info.hf
    except DataPrepError as e:
        print(f"WARNING: cannot load the tokenizer: {e}", file=out)
    shown = 0
    for rec in m["shards"]:
        if shown >= samples:
            break
        try:
            for key, ids in iter_tar_samples(os.path.join(shard_dir, rec["name"])):
                text = tok.decode(ids.tolist()) if tok is not None else str(ids.tolist())
                print(f"\n--- {key} ({rec['split']}, {ids.size} tokens)\n{text}", file=out)
                shown += 1
                if shown >= samples:
                    break
        except (DataPrepError, OSError) as e:
            print(f"WARNING: {rec['name']}: {e}", file=out)
    if not verify:
        return True
    problems = verify_shards(shard_dir, m)
    print(f"\nverify: {len(m['shards'])} shards, "
          + ("all match the manifest" if not problems else f"{len(problems)} problems:"), file=out)
    for p in problems:
        print(f"  {p}", file=out)
    return not problems
