"""The journal of a run, written before anything is sent to MLflow, and the sender's queue, in the run directory:
``metrics.jsonl`` (a record a line: ``{"step", "key", "value", "timestamp"}``, ms as sent), ``tracking_events.jsonl``
(``{"kind": "params" | "tags" | "artifact", ...}``, scrubbed), ``mlflow_run.json`` (run id, tracking URI without
credentials, experiment; after close its status and how many records were unsent) and ``tracking_artifacts/``.
A writer killed mid-line leaves a torn last line: readers skip it, the next writer starts on a fresh line.
"""

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

METRICS_FILE, EVENTS_FILE = "metrics.jsonl", "tracking_events.jsonl"
RUN_INFO_FILE, DICT_ARTIFACT_DIR = "mlflow_run.json", "tracking_artifacts"


def _open_append(path: Path) -> IO[str]:
    """Open for appending, first ending a torn last line left by a killed writer."""
    handle = open(path, "a", encoding="utf-8")
    if handle.tell() > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            handle.write("" if f.read(1) == b"\n" else "\n")
    return handle


class Journal:
    """Append-only JSON-lines files; thread-safe. An append is flushed before it returns (a killed process loses
    nothing) and fsynced at once by a background thread (a power cut loses at most the last milliseconds, and
    logging does not wait the ~3 ms of an fsync)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock, self._closed = threading.Lock(), False
        self._files: dict[str, IO[str]] = {}  # opened at the first append: a new run sets older files aside first
        self._fsyncs, self._next_fsync = ThreadPoolExecutor(1, "journal-fsync"), None

    def append_metrics(self, records: Iterable[dict[str, Any]]) -> None:
        self._append(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))

    def append_event(self, kind: str, **fields: Any) -> None:
        self._append(EVENTS_FILE, json.dumps({"kind": kind, **fields}) + "\n")

    def _append(self, name: str, text: str) -> None:
        with self._lock:
            if self._closed:
                logger.warning("journal of %s already closed: record not logged", self.run_dir)
                return
            if name not in self._files:
                self._files[name] = _open_append(self.run_dir / name)
            self._files[name].write(text)
            self._files[name].flush()
            if not self._next_fsync or self._next_fsync.running() or self._next_fsync.done():  # not yet queued
                self._next_fsync = self._fsyncs.submit(self._fsync)

    def _fsync(self) -> None:
        with self._lock:  # duplicates stay open even if `close` closes the files meanwhile
            fds = [os.dup(handle.fileno()) for handle in self._files.values() if not handle.closed]
        for fd in fds:
            os.fsync(fd)
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._fsyncs.shutdown(wait=True)
        self._fsync()
        with self._lock:
            for handle in self._files.values():
                handle.close()


def set_aside(run_dir: str | os.PathLike) -> None:
    """Rename an earlier run's journal files (``metrics.<old run id>.<unix time>.jsonl``, likewise the events),
    so that a new run's journal, and sync, hold only its own records."""
    run_dir = Path(run_dir)
    tag = f"{saved_run_id(run_dir) or 'unknown'}.{int(time.time())}"
    for path in (run_dir / METRICS_FILE, run_dir / EVENTS_FILE):
        if path.exists() and path.stat().st_size > 0:
            os.replace(path, moved := path.with_name(f"{path.stem}.{tag}{path.suffix}"))
            logger.info("new run in %s: the earlier %s is now %s", run_dir, path.name, moved.name)


def read_from(path: Path, offset: int = 0, limit: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """The records from byte `offset` on (at most `limit`), each with the offset after it; a line still being
    written (no newline yet) is left for the next read."""
    records, bad = [], 0
    if not path.exists():
        return records
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n") or 0 < limit <= len(records):
                break
            offset += len(line)
            try:
                if line.strip():
                    records.append((offset, json.loads(line)))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        logger.warning("%s: skipped %d unreadable line(s) (torn writes)", path, bad)
    return records


def read_records(run_dir: str | os.PathLike, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """All records of a journal file (the metrics unless `name` says otherwise), in the order they were logged."""
    return [record for _, record in read_from(Path(run_dir) / name)]


def write_run_info(run_dir: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write mlflow_run.json atomically (a reader never sees half a file) and durably."""
    path = Path(run_dir) / RUN_INFO_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")  # one per writing thread
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """mlflow_run.json, or None when the run directory has none."""
    path = Path(run_dir) / RUN_INFO_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def saved_run_id(run_dir: str | os.PathLike) -> str | None:
    """The MLflow run id recorded for a run directory, so a restarted training can resume it."""
    return (read_run_info(run_dir) or {}).get("run_id")
