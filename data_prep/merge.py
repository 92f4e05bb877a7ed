"""``merge``: one ``manifest.json`` over the part manifests that ``--part I --parts N`` builds wrote
into one directory. Checks that every part finished, that they share tokenizer, seq_len and flags,
and that their shard files are present with the recorded sizes (``inspect --verify`` checks sha256).
"""

from __future__ import annotations

import logging
import os
import re

from .errors import DataPrepError
from .manifest import MANIFEST, read_manifest, split_totals, write_json_atomic
from .readers import EMPTY_FIX

logger = logging.getLogger(__name__)

_PART_RE = re.compile(r"^manifest\.part-(\d{5})-of-(\d{5})\.json$")
_SAME = ("format_version", "seq_len", "vocab_size", "dtype")
_FLAGS_FREE = ("part", "workers")
_PART_KEYS = ("parts", "documents", "content_tokens")
_SAME_BUILD = "rebuild this part with the same --input, flags and --tokenizer as part 0"


def merge_parts(out_dir: str) -> dict:
    """Write ``<out_dir>/manifest.json`` over all parts; returns it."""
    if not os.path.isdir(out_dir):
        raise DataPrepError("a file, not a directory" if os.path.exists(out_dir) else "no such directory",
                            where=out_dir, fix="pass the --out directory the --part builds wrote to")
    names = sorted(os.listdir(out_dir))
    found = {(int(m[1]), int(m[2])): n for n in names if (m := _PART_RE.match(n))}
    if not found:
        fix = ("nothing to merge: it is a single build, use it as it is" if MANIFEST in names else
               "build the parts into it first: `python -m data_prep build ... --part I --parts N --out DIR`")
        raise DataPrepError("no part manifests (manifest.part-*-of-*.json)", where=out_dir, fix=fix)
    counts = {n for _, n in found}
    if len(counts) > 1:
        raise DataPrepError(f"part manifests of different --parts counts {sorted(counts)}", where=out_dir,
                            fix="give each multi-part build its own --out; remove the other build's files")
    parts = counts.pop()
    running = [n for n in names if n.startswith(".incomplete.part-")]
    missing = [i for i in range(parts) if (i, parts) not in found]
    if missing or running:
        raise DataPrepError(f"parts not finished: missing {missing}"
                            + (f", still running or crashed: {running}" if running else ""), where=out_dir,
                            fix="build the missing parts (--part I) or wait for the running ones; a crashed "
                                "part restarts cleanly when run again")
    files = [os.path.join(out_dir, found[i, parts]) for i in range(parts)]
    mans = [read_manifest(f, _PART_KEYS) for f in files]
    first = mans[0]
    for i, m in enumerate(mans[1:], start=1):
        for k in _SAME:
            if m[k] != first[k]:
                raise DataPrepError(f"{k} {m[k]!r} differs from part 0's {first[k]!r}", where=files[i],
                                    fix=_SAME_BUILD)
        if m["tokenizer"]["vocab_sha256"] != first["tokenizer"]["vocab_sha256"]:
            raise DataPrepError("another tokenizer than part 0's", where=files[i], fix=_SAME_BUILD)
        fa = {k: v for k, v in m["tool"]["flags"].items() if k not in _FLAGS_FREE}
        fb = {k: v for k, v in first["tool"]["flags"].items() if k not in _FLAGS_FREE}
        if fa != fb:
            diff = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
            raise DataPrepError(f"built with other flags than part 0: {diff}", where=files[i], fix=_SAME_BUILD)
    n_sources = sum(len(m["sources"]) for m in mans)
    if n_sources != first["parts"]["sources_total"]:
        raise DataPrepError(f"parts hold {n_sources} sources, expected {first['parts']['sources_total']}",
                            where=out_dir, fix="rebuild every part with the same --input list")
    for i, m in enumerate(mans):
        for s in m["shards"]:
            path = os.path.join(out_dir, s["name"])
            if not os.path.isfile(path) or os.path.getsize(path) != s["bytes"]:
                raise DataPrepError(f"shard missing or not the {s['bytes']} bytes part {i} recorded", where=path,
                                    fix=f"rebuild part {i}: remove {found[i, parts]} and its shards, then run "
                                        f"--part {i} again")
    shards = ([s for m in mans for s in m["shards"] if s["split"] == "train"]
              + [s for m in mans for s in m["shards"] if s["split"] == "val"])
    if len({s["name"] for s in shards}) != len(shards):
        raise DataPrepError("two parts list the same shard name", where=out_dir,
                            fix="give each multi-part build its own --out and rebuild")
    sources = sorted((s for m in mans for s in m["sources"]), key=lambda s: s["path"])
    docs = {k: sum(m["documents"][k] for m in mans) for k in ("in", "kept", "skipped")}
    reasons: dict[str, int] = {}
    for m in mans:
        for r, n in m["documents"]["skipped_by_reason"].items():
            reasons[r] = reasons.get(r, 0) + n
    if docs["kept"] == 0:
        raise DataPrepError("empty corpus: no part kept any document", where=out_dir, fix=EMPTY_FIX)
    if not any(s["split"] == "train" for s in shards):
        raise DataPrepError("corpus too small: the parts hold no training sequence", where=out_dir,
                            fix="add documents, or rebuild every part with a smaller --seq-len")
    flags = {k: v for k, v in first["tool"]["flags"].items() if k != "part"}
    merged = {**first,
              "shards": shards, "splits": split_totals(shards),
              "documents": {**docs, "skipped_by_reason": dict(sorted(reasons.items()))},
              "content_tokens": sum(m["content_tokens"] for m in mans),
              "remainder_tokens": sum(m["remainder_tokens"] for m in mans),
              "sources": sources,
              "parts": {"parts": parts, "manifests": [found[i, parts] for i in range(parts)]},
              "tool": {**first["tool"], "flags": flags}}
    write_json_atomic(os.path.join(out_dir, MANIFEST), merged)
    logger.info("merged %d parts into %s", parts, os.path.join(out_dir, MANIFEST))
    return merged
