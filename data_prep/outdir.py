"""The output directory: the "not empty" check, crash leftovers, and what a build created.

A build writes a marker file first and removes it last. A re-run after a crash finds the marker,
removes that build's leftovers (only files it would itself write) and restarts from scratch;
builds are deterministic, so the result is the one an uninterrupted run gives, with nothing
duplicated or lost. Files of other parts (``--part``) are left alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from .errors import DataPrepError, os_problem
from .manifest import MANIFEST, part_manifest_name

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
_ANY_SHARD = re.compile(r"^(train|val)-(\d{5}-)?\d{6}\.tar(\.tmp)?$")
_ANY_PART = re.compile(r"^(manifest\.part-\d{5}-of-\d{5}\.json(\.tmp)?|\.incomplete\.part-\d{5}-of-\d{5})$")


def part_tag(part: int, parts: int) -> str:
    """The part's infix in shard names: none for a single-part build."""
    return "" if parts == 1 else f"{part:05d}-"


def marker_name(part: int, parts: int) -> str:
    return ".incomplete" if parts == 1 else f".incomplete.part-{part:05d}-of-{parts:05d}"


def _mine(name: str, part: int, parts: int) -> bool:
    """Would this build (this part) write a file of this name?"""
    tag = part_tag(part, parts)
    if re.match(rf"^(train|val)-{tag}\d{{6}}\.tar(\.tmp)?$", name):
        return True
    if parts == 1:
        return name in (MANIFEST, MANIFEST + ".tmp", TOKENIZER_DIR, marker_name(part, parts)) \
            or name.startswith(".tokenizer.tmp-")
    return name in (part_manifest_name(part, parts), part_manifest_name(part, parts) + ".tmp",
                    marker_name(part, parts))


def _other_part(name: str) -> bool:
    """Files any part of a multi-part build writes (a part placing the shared tokenizer, too)."""
    return (bool(_ANY_SHARD.match(name) or _ANY_PART.match(name)) or name == TOKENIZER_DIR
            or name.startswith(".tokenizer.tmp-"))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def check_writable(out_dir: str) -> bool:
    """Create ``out_dir`` if needed and check it is a writable directory (build and tokenizer
    ``--out``); returns True when this call created it."""
    created = not os.path.exists(out_dir)
    if not created and not os.path.isdir(out_dir):
        raise DataPrepError("exists and is not a directory", where=f"--out {out_dir}",
                            fix="pass a new directory path to --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise os_problem(e, "cannot create the output directory", f"--out {out_dir}") from e
    if not os.access(out_dir, os.W_OK):
        raise DataPrepError("output directory not writable", where=f"--out {out_dir}",
                            fix="fix its permissions or pass another --out")
    return created


def not_empty(out_dir: str, names: list[str], note: str = "") -> DataPrepError:
    """The error for an ``--out`` holding files: nothing is ever overwritten."""
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    return DataPrepError(f"output directory is not empty ({shown}){note}", where=f"--out {out_dir}",
                         fix="use a new directory or remove this one")


def prepare(out_dir: str, part: int, parts: int) -> bool:
    """Check ``out_dir`` and claim it for this build; returns True when this call created it."""
    created = check_writable(out_dir)
    names = sorted(os.listdir(out_dir))
    marker = marker_name(part, parts)
    if parts == 1:
        foreign = [n for n in names if not _mine(n, part, parts)]
        done = bool(names) and marker not in names
    else:
        foreign = [n for n in names if not (_mine(n, part, parts) or _other_part(n))]
        if MANIFEST in names:
            foreign.append(MANIFEST)
        done = part_manifest_name(part, parts) in names
        done = done or (marker not in names and any(_mine(n, part, parts) for n in names
                                                    if n != TOKENIZER_DIR))
    if foreign or done:
        raise not_empty(out_dir, foreign or names, "" if parts == 1 else f", part {part} of {parts} already built?")
    if marker in names:
        left = [n for n in names if _mine(n, part, parts) and n != marker
                and (parts == 1 or n != TOKENIZER_DIR)]
        logger.warning("%s: an earlier build stopped before finishing; removing its %d leftover "
                       "files and restarting", out_dir, len(left))
        for n in left:
            _remove(os.path.join(out_dir, n))
    with open(os.path.join(out_dir, marker), "w", encoding="utf-8") as f:
        f.write("a data_prep build is writing here; if it is not running any more, re-run it\n")
    return created


def finish(out_dir: str, part: int, parts: int) -> None:
    """Mark the build complete (the manifest is already in place)."""
    os.remove(os.path.join(out_dir, marker_name(part, parts)))


def cleanup_failed(out_dir: str, part: int, parts: int, created_dir: bool, created: list[str]) -> None:
    """After an error: remove what this build wrote, so the directory is as it was."""
    for path in created:
        try:
            _remove(path)
        except OSError as e:  # best effort: never hide the original error
            logger.warning("could not remove %s: %s", path, e)
    try:
        os.remove(os.path.join(out_dir, marker_name(part, parts)))
        if created_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)
    except OSError:
        pass
