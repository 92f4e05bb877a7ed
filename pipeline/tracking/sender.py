"""The Tracker of rank 0: logging scrubs and journals a record; a daemon thread sends what lies in the journal past
the offsets MLflow has, a round a second so records gather into batches (a resumed run first gets what its journal
holds and MLflow lacks). While MLflow fails with a transient error (refused connection, timeout, 5xx, 429) the
offsets stay, one warning is logged, and the thread retries every retry_seconds.
"""

import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.tracking.journal import (DICT_ARTIFACT_DIR, EVENTS_FILE, METRICS_FILE, Journal, read_from,
                                       read_records, saved_run_id, set_aside, write_run_info)
from pipeline.tracking.scrub import describe_error, known_secrets, param_values, redact_url, scrub_obj
from pipeline.tracking.sync import CHUNK, RunTarget, is_transient, open_run, send_missing, send_records

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S, SEND_INTERVAL_S = 30.0, 1.0
# MLflow's HTTP client retries a failed request 7 times with backoff (minutes) and waits 120 s for an answer, read from
# the environment at each request: this process gets no retry and 15 s (the thread retries), unless exported otherwise.
FAST_FAIL_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class MlflowTracker:
    """Journals every record in `run_dir` (see `journal`) and sends the journal to MLflow from a daemon thread."""

    def __init__(self, client: Any, run_dir: str | os.PathLike, target: RunTarget, *, retry_seconds: float,
                 close_timeout: float = CLOSE_TIMEOUT_S) -> None:
        self.client, self.target, self.run_dir, self.run_id = client, target, Path(run_dir), target.run_id
        self.retry_seconds, self.close_timeout, self.refused = retry_seconds, close_timeout, 0
        self.journal, self._secrets, self._bad_keys = Journal(run_dir), known_secrets(target.uri), set()
        resumed = target.run_id and saved_run_id(run_dir) == target.run_id  # what the killed process may not have sent
        self._backlog = (read_records(run_dir), read_records(run_dir, EVENTS_FILE)) if resumed else None
        if not target.run_id:  # a new run gets a journal of its own
            set_aside(run_dir)
        # where MLflow's copy of each journal file ends (what was there before is the backlog)
        self._sent = {name: os.path.getsize(p) if (p := self.run_dir / name).exists() else 0
                      for name in (EVENTS_FILE, METRICS_FILE)}
        self._opened = self._failed = self._quit = self._closed = False
        self._terminate, self._pause, self._down_since = None, SEND_INTERVAL_S, None
        self._wake, self._round_done = threading.Event(), threading.Event()
        self._write_info()
        for name, value in FAST_FAIL_HTTP.items():
            os.environ.setdefault(name, value)
        try:  # a run MLflow refuses fails the start; while MLflow is down, the thread opens it later
            self._open()
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._note_outage(exc)
            self._pause = retry_seconds
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- the Tracker, called from the training thread ------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self.journal.append_event("params", data=scrub_obj(param_values(params), self._secrets))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp, step, records = int(time.time() * 1000), int(step), []
        for key, value in metrics.items():
            try:
                records.append({"step": step, "key": key, "value": float(value), "timestamp": timestamp})
            except (TypeError, ValueError):
                if key not in self._bad_keys:  # once a key, not at every step
                    self._bad_keys.add(key)
                    logger.warning("metric %r is not a number (%r); not logged", key, value)
        self.journal.append_metrics(records)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.journal.append_event("tags", data=scrub_obj({k: str(v) for k, v in tags.items()}, self._secrets))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Log a file or directory; it is read when sent, so leave it in place until close."""
        self.journal.append_event("artifact", path=os.path.abspath(path), artifact_path=artifact_path)

    def log_dict(self, obj: dict, file_name: str) -> None:
        """Save `obj` as JSON (secrets redacted) under run_dir/tracking_artifacts and log it."""
        rel = Path(file_name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"log_dict file_name must be a relative path: {file_name!r}")
        local = self.run_dir / DICT_ARTIFACT_DIR / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(scrub_obj(obj, self._secrets), indent=2, sort_keys=True, default=str) + "\n",
                         encoding="utf-8")
        self.log_artifact(str(local), None if rel.parent == Path(".") else rel.parent.as_posix())

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Send now, even while MLflow is down: True once MLflow has everything, False when a try fails or
        `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while self._has_work() and self._thread.is_alive():
            self._round_done.clear()
            self._wake.set()
            if not self._round_done.wait(deadline - time.monotonic()) or self._failed:
                return False
        return not self._has_work()

    def close(self, status: str = "FINISHED") -> None:
        """Send what is left and end the run with `status` (bounded wait; a last try if MLflow is down), stop the
        thread and record in mlflow_run.json how it ended; idempotent."""
        if self._closed:
            return
        self._closed, self._terminate = True, status
        sent = self.flush(self.close_timeout)
        self._quit = True  # a thread stuck in a call stops after it
        self._wake.set()
        self.journal.close()
        self._write_info(status=status, unsent_at_close=(unsent := self.unsent()), refused=self.refused)
        if not sent:
            logger.warning("%d MLflow record(s) not sent; they are in %s: run `python -m pipeline.tracking sync %s` "
                           "when MLflow is back", unsent, self.run_dir, self.run_dir)

    def unsent(self) -> int:
        """Journal records MLflow does not have yet (besides an unsent backlog)."""
        return sum(len(read_from(self.run_dir / name, offset)) for name, offset in self._sent.items())

    # -- the sending thread --------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return not self._opened or self._terminate is not None or self.unsent() > 0

    def _loop(self) -> None:
        while not self._quit:
            self._wake.wait(self._pause)
            self._wake.clear()
            if not self._quit:
                self._failed = not self._send_all()
                self._pause = self.retry_seconds if self._failed else SEND_INTERVAL_S
                self._round_done.set()

    def _send_all(self) -> bool:
        try:
            if not self._opened:
                self._open()
            if self._backlog is not None:  # before this process's own records
                counts = send_missing(self.client, self.run_id, *self._backlog, self._secrets)
                logger.info("resumed run %s: sent what the journal had and MLflow lacked: %s", self.run_id, counts)
                self.refused, self._backlog = self.refused + counts["refused"], None
            self._send_journal()
            if self._terminate is not None and not self.unsent():
                self.client.set_terminated(self.run_id, self._terminate)
                self._terminate = None
        except Exception as exc:
            if is_transient(exc):
                self._note_outage(exc)
            else:  # the run itself is refused (deleted, bad id): nothing more can go through
                logger.error("MLflow refused run %s (%s); what is unsent stays in the journal", self.run_id,
                             describe_error(exc, self._secrets))
                self._quit = True
            return False
        if self._down_since is not None:
            logger.info("MLflow at %s is reachable again after %.0f s", redact_url(self.target.uri, drop_userinfo=True),
                        time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _open(self) -> None:
        self.run_id, self._opened = open_run(self.client, self.target), True
        self._write_info()

    def _write_info(self, **extra: Any) -> None:
        info = {**asdict(self.target), "run_id": self.run_id, "uri": redact_url(self.target.uri, drop_userinfo=True)}
        write_run_info(self.run_dir, {**info, **extra})

    def _send_journal(self) -> None:
        """Events a line at a time, metrics a chunk at a time; an offset stays at the first record MLflow lacks."""
        from mlflow.entities import Metric

        for end, event in read_from(self.run_dir / EVENTS_FILE, self._sent[EVENTS_FILE]):
            kind, items = event["kind"], list(event.get("data", {}).items())
            if kind == "artifact":
                kind, items = "artifacts", [(event["path"], event.get("artifact_path"))]
            self.refused += send_records(self.client, self.run_id, kind, items, self._secrets)
            self._sent[EVENTS_FILE] = end
        while records := read_from(self.run_dir / METRICS_FILE, self._sent[METRICS_FILE], limit=CHUNK["metrics"]):
            metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for _, r in records]
            try:
                self.refused += send_records(self.client, self.run_id, "metrics", metrics, self._secrets)
            finally:  # send_records leaves in `metrics` what MLflow does not have
                if len(metrics) < len(records):
                    self._sent[METRICS_FILE] = records[len(records) - len(metrics) - 1][0]

    def _note_outage(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("MLflow at %s is unreachable (%s); training goes on, records are journaled and re-sent "
                           "every %g s", redact_url(self.target.uri, drop_userinfo=True),
                           describe_error(exc, self._secrets), self.retry_seconds)
