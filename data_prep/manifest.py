"""``manifest.json``: writing (atomically), reading with a check of the contract keys
(docs/ARCHITECTURE.md section 1), and a short human summary."""

from __future__ import annotations

import json
import os
from typing import Any

from . import FORMAT_VERSION
from .errors import REBUILD, DataPrepError, os_problem

MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "seq_len", "vocab_size", "dtype", "tokenizer", "shards", "splits",
                 "sources", "remainder_tokens", "tool")
SHARD_KEYS = ("name", "split", "samples", "tokens", "bytes", "sha256")
TOKENIZER_KEYS = ("dir", "vocab_sha256", "special_ids")
_OUTPUT_DIR = "pass the --out directory of a finished `python -m data_prep build`"


def part_manifest_name(part: int, parts: int) -> str:
    return f"manifest.part-{part:05d}-of-{parts:05d}.json"


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path.tmp``, fsync, rename: readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise os_problem(e, "cannot write", path) from e


def split_totals(shards: list[dict]) -> dict[str, dict[str, int]]:
    out = {s: {"samples": 0, "tokens": 0, "shards": 0} for s in ("train", "val")}
    for rec in shards:
        t = out[rec["split"]]
        t["samples"] += rec["samples"]
        t["tokens"] += rec["tokens"]
        t["shards"] += 1
    return out


def no_manifest(shard_dir: str) -> DataPrepError:
    """The error for a directory without ``manifest.json``: what it looks like, what to pass."""
    try:
        names = os.listdir(shard_dir)
    except OSError:
        names = []
    if ".incomplete" in names:
        return DataPrepError("an unfinished build (no manifest.json, an .incomplete marker)", where=shard_dir,
                             fix="re-run the build that writes here: it restarts cleanly")
    if any(n.startswith("manifest.part-") for n in names):
        return DataPrepError("part manifests not merged yet (no manifest.json)", where=shard_dir,
                             fix=f"run `python -m data_prep merge {shard_dir}` once every part is built")
    return DataPrepError("not a data_prep output directory (no manifest.json)", where=shard_dir, fix=_OUTPUT_DIR)


def read_manifest(path: str, required: tuple[str, ...] = ()) -> dict:
    """Read a manifest (a file, or a shard dir holding ``manifest.json``) and check its keys
    (``REQUIRED_KEYS`` and ``required``) and the types the readers rely on."""
    if not os.path.exists(path):
        raise DataPrepError("no such file or directory", where=path, fix=_OUTPUT_DIR)
    if os.path.isdir(path):
        if not os.path.lexists(os.path.join(path, MANIFEST)):
            raise no_manifest(path)
        path = os.path.join(path, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except IsADirectoryError as e:
        raise DataPrepError("not a manifest: a directory", where=path, fix=_OUTPUT_DIR) from e
    except OSError as e:
        raise os_problem(e, "cannot read the manifest", path) from e
    except UnicodeDecodeError as e:
        raise DataPrepError(f"not a manifest: not UTF-8 text ({e.reason} at byte {e.start})", where=path,
                            fix=REBUILD) from e
    except json.JSONDecodeError as e:
        raise DataPrepError(f"not a manifest: invalid JSON at line {e.lineno}: {e.msg}", where=path,
                            fix=REBUILD) from e
    if not isinstance(m, dict):
        raise DataPrepError(f"not a manifest: a JSON {type(m).__name__}, not an object", where=path, fix=REBUILD)
    missing = [k for k in (*REQUIRED_KEYS, *required) if k not in m]
    if missing:
        raise DataPrepError(f"manifest lacks keys {missing}", where=path, fix=REBUILD)
    if m["format_version"] != FORMAT_VERSION:
        raise DataPrepError(f"format_version {m['format_version']!r}, this tool reads {FORMAT_VERSION}",
                            where=f"{path} format_version", fix=REBUILD)
    _check_types(path, m)
    for i, rec in enumerate(m["shards"]):
        lacking = [k for k in SHARD_KEYS if k not in rec]
        if lacking:
            raise DataPrepError(f"shard record lacks keys {lacking}", where=f"{path} shards[{i}]", fix=REBUILD)
        name = rec["name"]
        if (not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".")
                or not name.endswith(".tar")):
            raise DataPrepError(f"an unsafe or odd shard name {name!r}", where=f"{path} shards[{i}].name",
                                fix=REBUILD)
    return m


def _check_types(path: str, m: dict) -> None:
    """The containers the readers index into: a hand-edited manifest fails here, not in a KeyError."""
    kinds = {"shards": list, "sources": list, "tokenizer": dict, "splits": dict}
    for key, kind in kinds.items():
        if not isinstance(m[key], kind):
            raise DataPrepError(f"{key} is a JSON {type(m[key]).__name__}, expected {kind.__name__}",
                                where=f"{path} {key}", fix=REBUILD)
    for split in ("train", "val"):
        if not isinstance(m["splits"].get(split), dict):
            raise DataPrepError(f"no {split} totals", where=f"{path} splits.{split}", fix=REBUILD)
    lacking = [k for k in TOKENIZER_KEYS if k not in m["tokenizer"]]
    if lacking:
        raise DataPrepError(f"tokenizer record lacks keys {lacking}", where=f"{path} tokenizer", fix=REBUILD)
    for i, rec in enumerate(m["shards"]):
        if not isinstance(rec, dict):
            raise DataPrepError(f"shard record is a JSON {type(rec).__name__}, expected object",
                                where=f"{path} shards[{i}]", fix=REBUILD)


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
