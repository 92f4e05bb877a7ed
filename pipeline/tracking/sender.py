"""Sending to MLflow from one background thread: batched, retried, never in training's way.

The training thread only appends to in-memory buffers (after the journal has the records); a daemon
thread sends them with ``log_batch``. A resumed run first gets what its journal holds and MLflow
lacks (records still buffered when the previous process was killed). When MLflow fails with a transient error (connection refused,
timeout, 5xx, 429), what was taken goes back to the buffer, one warning is logged for the outage,
and the thread tries again every ``retry_seconds``; when it gets through, it logs the recovery.
A record MLflow refuses for good (4xx: a bad key, a param whose value may not change) is dropped
with a warning; it stays in the journal. The metric buffer is bounded; what overflows is only in
the journal, for ``python -m pipeline.tracking sync``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.tracking.scrub import scrub_text, staged_artifact

logger = logging.getLogger(__name__)

# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes) and
# waits up to 120 s for a response; it reads both from the environment at every request. Inside
# `fast_fail_http` the tracker's own requests get no retry and a 15 s timeout instead, since the
# sender retries on its own schedule. Values the user has exported are left alone.
_FAST_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_ENV_LOCK = threading.RLock()
SEND_INTERVAL_S = 1.0
_BATCH = {"params": 100, "tags": 100, "metrics": 1000, "artifacts": 1}


@contextlib.contextmanager
def fast_fail_http() -> Iterator[None]:
    """Run MLflow calls with no HTTP retry and a short timeout (process env, lock-serialized)."""
    with _ENV_LOCK:
        added = [name for name in _FAST_HTTP_ENV if name not in os.environ]
        for name in added:
            os.environ[name] = _FAST_HTTP_ENV[name]
        try:
            yield
        finally:
            for name in added:
                os.environ.pop(name, None)


def public_uri(text: str) -> str:
    """`text` with any ``user:password@`` removed from URLs in it."""
    return re.sub(r"(//)[^/@\s]*@", r"\1", text)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later (server down or overloaded), as opposed to refused for good."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return not isinstance(exc, (FileNotFoundError, NotADirectoryError, TypeError, ValueError))


@dataclass
class RunTarget:
    """Where the run lives; `run_id` set means resume that run."""

    uri: str
    experiment: str
    run_name: str
    artifact_location: str | None = None
    run_id: str | None = None


def ensure_experiment(client: Any, target: RunTarget) -> str:
    """Id of the experiment named in `target`, created (with its artifact location) if missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(target.experiment)
    if exp is None:
        try:
            return client.create_experiment(
                target.experiment, artifact_location=target.artifact_location)
        except MlflowException as exc:  # another process created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(target.experiment)
    if exp.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment {target.experiment!r} is deleted: restore it "
                         "(mlflow experiments restore) or set tracking.experiment to another name")
    return exp.experiment_id


def open_run(client: Any, target: RunTarget) -> str:
    """Create the run, or mark the run being resumed RUNNING again; returns its id."""
    if target.run_id:
        client.update_run(target.run_id, status="RUNNING")
        return target.run_id
    experiment_id = ensure_experiment(client, target)
    return client.create_run(experiment_id, run_name=target.run_name).info.run_id


class Sender:
    """Buffers of params, tags, metrics and artifacts, drained by a daemon thread."""

    def __init__(self, client: Any, target: RunTarget, *, retry_seconds: float,
                 secrets: list[str], on_open: Callable[[str], None],
                 catch_up: Callable[[], None] | None = None, max_buffer: int = 200_000) -> None:
        self.client, self.target = client, target
        self.run_id: str | None = target.run_id
        self.retry_seconds, self.max_buffer = retry_seconds, max_buffer
        self.overflowed = self.refused = 0
        self._secrets, self._on_open, self._catch_up = secrets, on_open, catch_up
        self._opened = False
        self._pending: dict[str, Any] = {
            "params": {}, "tags": {}, "metrics": deque(), "artifacts": deque()}
        self._terminate: str | None = None
        self._cond = threading.Condition()
        self._next_try = 0.0
        self._down_since: float | None = None
        self._busy = self._closing = self._quit = False
        self._in_flight = 0  # records taken from the buffers and not yet confirmed
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)

    # -- called from the training thread -------------------------------------------------------
    def open_now(self) -> bool:
        """Try to create/resume the run right away; a transient failure leaves it to the thread."""
        try:
            with fast_fail_http():
                self._open()
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._note_outage(exc)
            self._next_try = time.monotonic() + self.retry_seconds
            return False
        return True

    def start(self) -> None:
        self._thread.start()

    def put(self, kind: str, items: Any) -> None:
        """Queue params/tags (a dict), metrics (a list of Metric) or artifacts (a list of pairs)."""
        with self._cond:
            buffer = self._pending[kind]
            if isinstance(buffer, dict):
                buffer.update(items)
            else:
                buffer.extend(items)
                self._trim()
            self._cond.notify_all()

    def unsent(self) -> int:
        with self._cond:
            return sum(len(buffer) for buffer in self._pending.values()) + self._in_flight

    def flush(self, timeout: float) -> bool:
        """Send now and wait until the buffers are empty; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._next_try = 0.0
            self._cond.notify_all()
            while self._has_work() or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, status: str, timeout: float) -> bool:
        """Send what is buffered (one more try if MLflow is down), then terminate the run."""
        with self._cond:
            self._terminate = status
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            self._quit = True  # a thread stuck in a call stops after it
            return not self._has_work() and not self._in_flight

    # -- the sender thread -----------------------------------------------------------------------
    def _has_work(self) -> bool:
        return any(self._pending.values()) or self._terminate is not None or not self._opened

    def _trim(self) -> None:
        metrics = self._pending["metrics"]
        if len(metrics) <= self.max_buffer:
            return
        if not self.overflowed:
            logger.warning("MLflow metric buffer full (%d); older records are only in the "
                           "journal until `python -m pipeline.tracking sync`", self.max_buffer)
        while len(metrics) > self.max_buffer:
            metrics.popleft()
            self.overflowed += 1

    def _next_action(self) -> str:
        if self._quit:
            return "quit"
        if not self._has_work():
            return "quit" if self._closing else "wait"
        if self._closing or time.monotonic() >= self._next_try:
            return "send"
        return "wait"

    def _wait_timeout(self) -> float | None:
        return max(0.0, self._next_try - time.monotonic()) if self._has_work() else None

    def _loop(self) -> None:
        while True:
            with self._cond:
                action = self._next_action()
                while action == "wait":
                    self._cond.wait(self._wait_timeout())
                    action = self._next_action()
                if action == "quit":
                    self._cond.notify_all()
                    return
                self._busy, was_closing = True, self._closing
            ok = self._send_all()
            with self._cond:
                self._busy = False
                if ok:  # let records gather for a moment: one batch a second, not one a step
                    self._next_try = max(self._next_try, time.monotonic() + SEND_INTERVAL_S)
                else:
                    self._next_try = time.monotonic() + self.retry_seconds
                    self._quit = self._quit or was_closing  # the final try failed: journal has it
                self._cond.notify_all()

    def _send_all(self) -> bool:
        try:
            with fast_fail_http():
                if not self._opened:
                    self._open()
                if self._catch_up is not None:  # once, before this process's own records
                    self._catch_up()
                    self._catch_up = None
                for kind in ("params", "tags", "metrics", "artifacts"):
                    self._drain(kind)
                self._send_terminate()
        except Exception as exc:
            if is_transient(exc):
                self._note_outage(exc)
            else:  # the run itself is refused (deleted, bad id): nothing more can go through
                logger.error("MLflow refused run %s (%s); what is unsent stays in the journal",
                             self.run_id, self._describe(exc))
                with self._cond:
                    self._quit = True
            return False
        self._note_recovery()
        return True

    def _open(self) -> None:
        self.run_id = open_run(self.client, self.target)
        self._opened = True
        self._on_open(self.run_id)

    def _take(self, kind: str) -> list[Any]:
        with self._cond:
            buffer, n = self._pending[kind], _BATCH[kind]
            if isinstance(buffer, dict):
                items = [(key, buffer.pop(key)) for key in list(buffer)[:n]]
            else:
                items = [buffer.popleft() for _ in range(min(n, len(buffer)))]
            self._in_flight = len(items)
            return items

    def _give_back(self, kind: str, items: list[Any]) -> None:
        with self._cond:
            self._in_flight = 0
            buffer = self._pending[kind]
            if isinstance(buffer, dict):
                for key, value in items:
                    buffer.setdefault(key, value)  # a newer value queued meanwhile wins
            else:
                buffer.extendleft(reversed(items))
                if kind == "metrics":
                    self._trim()

    def _drain(self, kind: str) -> None:
        while items := self._take(kind):
            try:
                self._send_chunk(kind, items)
            finally:
                with self._cond:
                    self._in_flight = 0

    def _send_chunk(self, kind: str, items: list[Any]) -> None:
        """Send one chunk; on a permanent refusal send its items one by one to drop only the bad."""
        try:
            self._send_items(kind, items)
            return
        except Exception as exc:
            if is_transient(exc):
                self._give_back(kind, items)
                raise
            if len(items) == 1:
                self._refuse(kind, items[0], exc)
                return
        for i, item in enumerate(items):
            try:
                self._send_items(kind, [item])
            except Exception as exc:
                if is_transient(exc):
                    self._give_back(kind, items[i:])
                    raise
                self._refuse(kind, item, exc)

    def _send_items(self, kind: str, items: list[Any]) -> None:
        from mlflow.entities import Param, RunTag

        if kind == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items])
        elif kind == "metrics":
            self.client.log_batch(self.run_id, metrics=items)
        else:
            for path, artifact_path in items:
                with staged_artifact(path, self._secrets) as upload:
                    self.client.log_artifact(self.run_id, upload, artifact_path)

    def _send_terminate(self) -> None:
        with self._cond:
            status = self._terminate if not any(self._pending.values()) else None
        if status is not None:
            self.client.set_terminated(self.run_id, status)
            with self._cond:
                self._terminate = None

    def _refuse(self, kind: str, item: Any, exc: BaseException) -> None:
        self.refused += 1
        name = getattr(item, "key", None) or item[0]
        logger.warning("MLflow refused %s %r (kept in the journal): %s",
                       kind, name, self._describe(exc))

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return public_uri(scrub_text(text, self._secrets))

    def _note_outage(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("MLflow at %s is unreachable (%s); training goes on, records are "
                           "journaled and re-sent every %g s", public_uri(self.target.uri),
                           self._describe(exc), self.retry_seconds)

    def _note_recovery(self) -> None:
        if self._down_since is not None:
            logger.info("MLflow at %s is reachable again after %.0f s; buffered records sent",
                        public_uri(self.target.uri), time.monotonic() - self._down_since)
            self._down_since = None
