"""The local journal of a run: what was logged, written before anything is sent to MLflow.

Files in the run directory:
- ``metrics.jsonl``: one metric record a line, ``{"step", "key", "value", "timestamp"}``
  (timestamp in ms since the epoch, the one sent to MLflow);
- ``tracking_events.jsonl``: params, tags and artifacts, ``{"kind": "params" | "tags" |
  "artifact", ...}``, already scrubbed of secrets;
- ``mlflow_run.json``: where the run lives (run id, tracking URI without credentials,
  experiment) and, after ``close``, its final status and how many records were left unsent;
- ``tracking_artifacts/``: the JSON files written by ``log_dict``.

A new run (not a resume) in a directory that holds an earlier run's journal sets those files
aside first (`set_aside`). Each append is flushed. A process killed mid-write leaves at most one torn last line: readers
skip it and the next writer starts on a fresh line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "tracking_events.jsonl"
RUN_INFO_FILE = "mlflow_run.json"
DICT_ARTIFACT_DIR = "tracking_artifacts"


def _open_append(path: Path) -> IO[str]:
    """Open for appending, first ending a torn last line left by a killed writer."""
    torn = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    handle = open(path, "a", encoding="utf-8")
    if torn:
        handle.write("\n")
    return handle


class Journal:
    """Append-only JSON-lines files under a run directory; safe to call from several threads."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._metrics = _open_append(self.run_dir / METRICS_FILE)
        self._events: IO[str] | None = None

    def append_metrics(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        with self._lock:
            self._metrics.write(lines)
            self._metrics.flush()

    def append_event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **fields}) + "\n"
        with self._lock:
            if self._events is None:
                self._events = _open_append(self.run_dir / EVENTS_FILE)
            self._events.write(line)
            self._events.flush()

    def close(self) -> None:
        with self._lock:
            self._metrics.close()
            if self._events is not None:
                self._events.close()


def set_aside(run_dir: str | os.PathLike) -> list[Path]:
    """Rename an earlier run's journal files, so a new run's journal (and sync) holds only its own.

    ``metrics.jsonl`` becomes ``metrics.<old run id>.<unix time>.jsonl``; likewise the events.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir) or {}
    tag = f"{info.get('run_id') or 'unknown'}.{int(time.time())}"
    moved = []
    for name in (METRICS_FILE, EVENTS_FILE):
        path = run_dir / name
        if path.exists() and path.stat().st_size > 0:
            target = path.with_name(f"{path.stem}.{tag}{path.suffix}")
            os.replace(path, target)
            moved.append(target)
    return moved


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        logger.warning("%s: skipped %d unreadable line(s) (torn writes)", path, bad)
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All metric records of a run directory, in the order they were logged."""
    return _read_jsonl(Path(run_dir) / METRICS_FILE)


def read_events(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All param/tag/artifact events of a run directory, in the order they were logged."""
    return _read_jsonl(Path(run_dir) / EVENTS_FILE)


def write_run_info(run_dir: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write mlflow_run.json atomically (a reader never sees half a file)."""
    path = Path(run_dir) / RUN_INFO_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The contents of mlflow_run.json, or None when the run directory has none."""
    path = Path(run_dir) / RUN_INFO_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def saved_run_id(run_dir: str | os.PathLike) -> str | None:
    """The MLflow run id recorded for a run directory, so a restarted training can resume it."""
    info = read_run_info(run_dir)
    return info.get("run_id") if info else None
