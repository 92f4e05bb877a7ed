"""MLflow tracking for training runs: a Tracker that never stops training and never loses a metric.

Rank 0 gets an `MlflowTracker` (`sender`): it scrubs each record (`scrub`), writes it to the run directory's journal
(`journal`), and its thread sends the journal to MLflow, through outages; other ranks, disabled tracking and tests get
a `NullTracker`. What is unsent at `close` stays for ``python -m pipeline.tracking sync <run_dir> [--uri URI]``
(`sync`). Importing this package does not import MLflow. A server for several users (loopback unless meant otherwise):
``mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1 --port 5000``
"""

import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from pipeline.tracking.journal import saved_run_id
from pipeline.tracking.scrub import known_secrets, redact_url, scrub_text
from pipeline.tracking.sender import MlflowTracker
from pipeline.tracking.sync import RunTarget, resolve_artifact_location, sqlite_path

__all__ = ["MlflowTracker", "NullTracker", "RunTarget", "Tracker", "resolve_uri", "saved_run_id", "start_tracker"]

logger = logging.getLogger(__name__)


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
    def log_params(self, params: dict[str, Any]) -> None: pass
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: pass
    def set_tags(self, tags: dict[str, str]) -> None: pass
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: pass
    def log_dict(self, obj: dict, file_name: str) -> None: pass
    def close(self, status: str = "FINISHED") -> None: pass


def resolve_uri(uri: str) -> str:
    """The tracking URI: the configured one, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def start_tracker(cfg: Any, run_dir: str, *, rank: int, run_name: str, resume_run_id: str | None = None) -> Tracker:
    """A NullTracker off rank 0 or when disabled; else an MlflowTracker on a new or resumed run.

    `cfg` has `enabled`, `uri`, `experiment`, `artifact_location`, `retry_seconds`. If MLflow is unreachable now,
    the run is created (or resumed) as soon as it answers; meanwhile everything is journaled. A resume id that
    MLflow does not know, or a deleted experiment, raises.
    """
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(cfg.uri)
    if (db := sqlite_path(uri)) is not None:
        # runs that start at once on a new sqlite file (a Slurm sweep) each ran MLflow's schema migrations and all
        # but one failed ("alembic ... expected to match one row"): they take turns under a lock file beside it
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    # the run name is shown in the UI and stored as a tag: no secret in it either
    target = RunTarget(uri, cfg.experiment, scrub_text(run_name, known_secrets(uri)),
                       resolve_artifact_location(cfg.artifact_location, uri), resume_run_id)
    tracker = MlflowTracker(MlflowClient(tracking_uri=uri), run_dir, target, retry_seconds=float(cfg.retry_seconds))
    logger.info("MLflow run %s (experiment %r) at %s; journal in %s", tracker.run_id, cfg.experiment,
                redact_url(uri, drop_userinfo=True), run_dir)
    return tracker
