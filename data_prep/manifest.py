"""``manifest.json``: writing (atomically), reading with a check of the contract keys
(docs/ARCHITECTURE.md section 1), and a short human summary."""

from __future__ import annotations

import json
import os
from typing import Any

from . import FORMAT_VERSION
from .errors import DataPrepError

MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "seq_len", "vocab_size", "dtype", "tokenizer", "shards", "splits",
                 "sources", "remainder_tokens", "tool")
SHARD_KEYS = ("name", "split", "samples", "tokens", "bytes", "sha256")


def part_manifest_name(part: int, parts: int) -> str:
    return f"manifest.part-{part:05d}-of-{parts:05d}.json"


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path.tmp``, fsync, rename: readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def split_totals(shards: list[dict]) -> dict[str, dict[str, int]]:
    out = {s: {"samples": 0, "tokens": 0, "shards": 0} for s in ("train", "val")}
    for rec in shards:
        t = out[rec["split"]]
        t["samples"] += rec["samples"]
        t["tokens"] += rec["tokens"]
        t["shards"] += 1
    return out


def read_manifest(path: str) -> dict:
    """Read a manifest (a file, or a shard dir holding ``manifest.json``) and check its keys."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError as e:
        raise DataPrepError(f"{path}: no manifest (an unfinished build, or parts not merged yet?)") from e
    except json.JSONDecodeError as e:
        raise DataPrepError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise DataPrepError(f"{path}: manifest lacks keys {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise DataPrepError(f"{path}: format_version {m['format_version']}, this tool reads "
                            f"{FORMAT_VERSION}")
    for i, rec in enumerate(m["shards"]):
        lacking = [k for k in SHARD_KEYS if k not in rec]
        if lacking:
            raise DataPrepError(f"{path}: shards[{i}] lacks keys {lacking}")
        name = rec["name"]
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".tar"):
            raise DataPrepError(f"{path}: shards[{i}] has an unsafe or odd name {name!r}")
    return m


def summary(m: dict) -> str:
    """A few lines: splits, documents, tokenizer."""
    sp = m["splits"]
    docs = m.get("documents", {})
    lines = [
        f"seq_len {m['seq_len']}, vocab {m['vocab_size']} ({m['dtype']}), "
        f"tokenizer sha256 {m['tokenizer']['vocab_sha256'][:12]}",
        f"train: {sp['train']['samples']} sequences, {sp['train']['tokens']} tokens, "
        f"{sp['train']['shards']} shards",
        f"val:   {sp['val']['samples']} sequences, {sp['val']['tokens']} tokens, "
        f"{sp['val']['shards']} shards",
        f"documents: {docs.get('in', '?')} in, {docs.get('kept', '?')} kept, "
        f"{docs.get('skipped', '?')} skipped {docs.get('skipped_by_reason', {}) or ''}".rstrip(),
        f"sources: {len(m['sources'])}, remainder tokens dropped: {m['remainder_tokens']}",
    ]
    errors = [s for s in m["sources"] if s.get("error")]
    for s in errors:
        lines.append(f"  skipped file {s['path']}: {s['error']}")
    return "\n".join(lines)
