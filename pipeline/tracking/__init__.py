"""MLflow tracking for training runs: a Tracker that never stops training and never loses a metric.

Library code logs through a `Tracker`. Rank 0 gets an `MlflowTracker`; other ranks, disabled
tracking and unit tests get a `NullTracker`. `MlflowTracker` writes every record to the run
directory's journal first (see `pipeline.tracking.journal`), then hands it to a background sender
(see `pipeline.tracking.sender`) that batches it to MLflow and re-sends through outages. What is
still unsent at `close` stays in the journal; this re-sends it, skipping what the run already has:

    python -m pipeline.tracking sync <run_dir> [--uri URI]

Secrets never leave (see `pipeline.tracking.scrub`). A tracking server for several users:
``mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1 --port 5000``
(bind 127.0.0.1 unless you mean to expose it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from pipeline.tracking import journal as journal_mod
from pipeline.tracking.scrub import env_secrets, param_values, scrub_mapping, scrub_obj, scrub_text

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: dict, file_name: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """A Tracker that records nothing (ranks other than 0, tracking disabled, unit tests)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: dict, file_name: str) -> None:
        pass

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        return True

    def close(self, status: str = "FINISHED") -> None:
        pass


def resolve_uri(uri: str) -> str:
    """The tracking URI: the configured one, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths resolved), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0]).resolve()


def _create_sqlite_schema(uri: str, db: Path) -> None:
    """Runs that start at once on a new sqlite file (a Slurm sweep) each ran MLflow's schema
    migrations and all but one failed ("alembic ... expected to match one row"): they take turns
    under a lock file beside the database."""
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def resolve_artifact_location(configured: str, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: as configured, beside a sqlite db, else server's."""
    if configured:
        return configured
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db else None


class MlflowTracker:
    """Journals every record in `run_dir`, then sends it to MLflow from a background thread."""

    def __init__(self, client: Any, run_dir: str | os.PathLike, target: Any, *,
                 retry_seconds: float, close_timeout: float = CLOSE_TIMEOUT_S) -> None:
        from pipeline.tracking.sender import Sender

        self.run_dir = Path(run_dir)
        self.target, self.close_timeout = target, close_timeout
        self._backlog = self._read_backlog()
        if not target.run_id:
            for moved in journal_mod.set_aside(self.run_dir):
                logger.info("new run in %s: the earlier journal is now %s", run_dir, moved.name)
        self.journal = journal_mod.Journal(self.run_dir)
        self._secrets = env_secrets()
        self._info_lock = threading.Lock()
        self._closed = False
        self._bad_keys: set[str] = set()
        self.sender = Sender(client, target, retry_seconds=retry_seconds, secrets=self._secrets,
                             on_open=lambda run_id: self._write_info({}),
                             catch_up=self._catch_up if self._backlog else None)
        self._write_info({})
        self.sender.open_now()
        self.sender.start()

    @property
    def run_id(self) -> str | None:
        return self.sender.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self._after_close():
            return
        values = scrub_mapping(param_values(params), self._secrets)
        self.journal.append_event("params", data=values)
        self.sender.put("params", values)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._after_close():
            return
        from mlflow.entities import Metric

        timestamp, step = int(time.time() * 1000), int(step)
        records = [{"step": step, "key": key, "value": value, "timestamp": timestamp}
                   for key, value in self._numeric(metrics).items()]
        self.journal.append_metrics(records)
        self.sender.put("metrics", [
            Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._after_close():
            return
        values = scrub_mapping({k: str(v) for k, v in tags.items()}, self._secrets)
        self.journal.append_event("tags", data=values)
        self.sender.put("tags", values)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Queue a file or directory; it is read when sent, so leave it in place until close."""
        if self._after_close():
            return
        path = os.path.abspath(path)
        self.journal.append_event("artifact", path=path, artifact_path=artifact_path)
        self.sender.put("artifacts", [(path, artifact_path)])

    def log_dict(self, obj: dict, file_name: str) -> None:
        """Save `obj` as JSON (secrets redacted) under run_dir/tracking_artifacts and log it."""
        rel = Path(file_name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"log_dict file_name must be a relative path: {file_name!r}")
        local = self.run_dir / journal_mod.DICT_ARTIFACT_DIR / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(scrub_obj(obj, self._secrets), indent=2, sort_keys=True, default=str)
        local.write_text(text + "\n", encoding="utf-8")
        parent = rel.parent.as_posix()
        self.log_artifact(str(local), None if parent == "." else parent)

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Send everything buffered now; False if MLflow did not take it all within `timeout`."""
        return self.sender.flush(timeout)

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered (bounded wait) and end the run with `status`; idempotent."""
        if self._closed:
            return
        self._closed = True
        sent = self.sender.close(status, self.close_timeout)
        unsent = self.sender.unsent() + self.sender.overflowed
        self._write_info({"status": status, "unsent_at_close": unsent,
                          "refused": self.sender.refused})
        self.journal.close()
        if not sent or self.sender.overflowed:
            logger.warning("%d MLflow record(s) not sent; they are in %s: run `python -m "
                           "pipeline.tracking sync %s` when MLflow is back",
                           unsent, self.run_dir, self.run_dir)

    def _read_backlog(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """The journal of the run being resumed here (None unless resuming this run_dir's run)."""
        run_id = self.target.run_id
        if not run_id or journal_mod.saved_run_id(self.run_dir) != run_id:
            return None
        return journal_mod.read_metrics(self.run_dir), journal_mod.read_events(self.run_dir)

    def _catch_up(self) -> None:
        """Queue what the previous process journaled and MLflow lacks (runs in the sender)."""
        from pipeline.tracking.sync import missing_metrics, missing_params, missing_tags

        metrics, events = self._backlog or ([], [])
        client, run_id = self.sender.client, self.run_id
        missing = missing_metrics(client, run_id, metrics)
        params, tags = missing_params(client, run_id, events), missing_tags(client, run_id, events)
        if missing or params or tags:
            logger.info("resumed run %s lacked %d journaled record(s); re-sending them",
                        run_id, len(missing) + len(params) + len(tags))
        self.sender.put("params", params)
        self.sender.put("tags", tags)
        self.sender.put("metrics", missing)
        self._backlog = None

    def _after_close(self) -> bool:
        if self._closed:
            logger.warning("tracker already closed: record not logged")
        return self._closed

    def _numeric(self, metrics: dict[str, Any]) -> dict[str, float]:
        out = {}
        for key, value in metrics.items():
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                if key not in self._bad_keys:
                    self._bad_keys.add(key)
                    logger.warning("metric %r is not a number (%r); not logged", key, value)
        return out

    def _write_info(self, extra: dict[str, Any]) -> None:
        from pipeline.tracking.sender import public_uri

        t = self.target
        info = {"run_id": self.run_id,
                "uri": public_uri(t.uri), "experiment": t.experiment, "run_name": t.run_name,
                "artifact_location": t.artifact_location, **extra}
        with self._info_lock:
            journal_mod.write_run_info(self.run_dir, info)


def start_tracker(cfg: Any, run_dir: str, *, rank: int, run_name: str,
                  resume_run_id: str | None = None) -> Tracker:
    """A NullTracker off rank 0 or when disabled; else an MlflowTracker on a new or resumed run.

    `cfg` has `enabled`, `uri`, `experiment`, `artifact_location`, `retry_seconds`. If MLflow is
    unreachable now, the run is created (or resumed) as soon as it answers; meanwhile everything
    is journaled. A resume id that MLflow does not know, or a deleted experiment, raises.
    """
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.sender import RunTarget, public_uri

    uri = resolve_uri(cfg.uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        _create_sqlite_schema(uri, db)
    # the run name is shown in the UI and stored as a tag: no secret in it either
    target = RunTarget(uri=uri, experiment=cfg.experiment, run_name=scrub_text(run_name, env_secrets()),
                       artifact_location=resolve_artifact_location(cfg.artifact_location, uri),
                       run_id=resume_run_id)
    tracker = MlflowTracker(MlflowClient(tracking_uri=uri), run_dir, target,
                            retry_seconds=float(cfg.retry_seconds))
    logger.info("MLflow run %s (experiment %r) at %s; journal in %s", tracker.run_id,
                cfg.experiment, public_uri(uri), run_dir)
    return tracker


def main(argv: list[str] | None = None) -> int:
    from pipeline.tracking.sync import sync_run

    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="re-send journaled records missing from the MLflow run")
    sync.add_argument("run_dir")
    sync.add_argument("--uri", default=None, help="tracking URI (default: the one recorded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = sync_run(args.run_dir, uri=args.uri)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if not report.get("refused") else 1


if __name__ == "__main__":
    raise SystemExit(main())
