"""Getting journaled records into MLflow: opening the run, `send_records` (the one way records are sent, by the
sender thread and by sync alike), and `sync_run` (``python -m pipeline.tracking sync``), which sends what a run's
journal holds and MLflow lacks: metrics by (key, step), params by key, tags by value, artifacts by name.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.tracking.journal import EVENTS_FILE, read_records, read_run_info, write_run_info
from pipeline.tracking.scrub import REDACTED, describe_error, known_secrets, staged_artifact

logger = logging.getLogger(__name__)

CHUNK = {"params": 100, "tags": 100, "metrics": 1000, "artifacts": 1}  # records per MLflow call


@dataclass
class RunTarget:
    """Where the run lives; `run_id` set means resume that run."""
    uri: str
    experiment: str
    run_name: str
    artifact_location: str | None = None
    run_id: str | None = None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths resolved), else None."""
    return Path(uri[len("sqlite:///"):].split("?")[0]).resolve() if uri.startswith("sqlite:///") else None


def resolve_artifact_location(configured: str, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: as configured, beside a sqlite db, else the server's."""
    db = sqlite_path(uri)
    return configured or ((db.parent / "mlartifacts").as_uri() if db else None)


def open_run(client: Any, target: RunTarget) -> str:
    """Create the run (and its experiment if missing), or mark the resumed run RUNNING; its id."""
    from mlflow.exceptions import MlflowException

    if target.run_id:
        client.update_run(target.run_id, status="RUNNING")
        return target.run_id
    if client.get_experiment_by_name(target.experiment) is None:
        try:
            client.create_experiment(target.experiment, artifact_location=target.artifact_location)
        except MlflowException as exc:  # another process created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    # MLflow refuses a run in a deleted experiment: restore it (mlflow experiments restore) or use another name
    return client.create_run(client.get_experiment_by_name(target.experiment).experiment_id,
                             run_name=target.run_name).info.run_id


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later (server down or overloaded), as opposed to refused for good."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500 or exc.get_http_status_code() == 429
    return not isinstance(exc, (FileNotFoundError, NotADirectoryError, TypeError, ValueError))


def send_records(client: Any, run_id: str, kind: str, items: list[Any], secrets: list[str]) -> int:
    """Send `items` (params/tags as (key, value), metrics as `Metric`s, artifacts as (path, artifact_path)) in chunks
    of CHUNK[kind]; returns how many MLflow refused for good. A refused chunk (4xx: a bad key, a param whose value
    may not change) is re-sent item by item, so only the bad items are dropped (with a warning; the journal keeps
    them). An item leaves `items` once MLflow took or refused it: when a transient error propagates, `items` holds
    exactly what is still unsent."""
    from mlflow.entities import Param, RunTag

    def send(chunk: list[Any]) -> None:
        if kind == "artifacts":
            for path, artifact_path in chunk:
                with staged_artifact(path, secrets) as upload:
                    client.log_artifact(run_id, upload, artifact_path)
        else:
            entity = {"params": Param, "tags": RunTag}.get(kind)
            client.log_batch(run_id, **{kind: [entity(k, v) for k, v in chunk] if entity else chunk})

    refused, singles = 0, 0  # singles: items of a refused chunk still to send one by one
    while items:
        chunk = items[:1 if singles else CHUNK[kind]]
        try:
            send(chunk)
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(chunk) > 1:
                singles = len(chunk)
                continue
            refused += 1
            name = getattr(chunk[0], "key", None) or chunk[0][0]
            logger.warning("MLflow refused %s %r (kept in the journal): %s", kind, name, describe_error(exc, secrets))
        del items[:len(chunk)]
        singles = max(0, singles - 1)
    return refused


def send_missing(client: Any, run_id: str, metrics: list[dict], events: list[dict], secrets: list[str]) -> dict:
    """Send the journaled records the run lacks; how many of each kind, and how many MLflow refused. A param MLflow
    has keeps its first value; the last tag and metric of a key (and step) win."""
    from mlflow.entities import Metric

    run, merged, latest = client.get_run(run_id), {"params": {}, "tags": {}}, {}
    for event in events:
        merged.get(event["kind"], {}).update(event.get("data", {}))
    for key, value in sorted((k, v) for k, v in merged["params"].items() if run.data.params.get(k, v) != v):
        logger.warning("param %r is %r in MLflow, %r in the journal: MLflow keeps the first", key,
                       run.data.params[key], value)
    for r in metrics:
        latest[r["key"], int(r["step"])] = r
    steps = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in {k for k, _ in latest}}
    artifacts = {(e["path"], e.get("artifact_path")) for e in events if e["kind"] == "artifact"}
    listed = {f.path for folder in {folder for _, folder in artifacts} for f in client.list_artifacts(run_id, folder)}
    artifacts = {(p, folder) for p, folder in artifacts if "/".join(filter(None, (folder, Path(p).name))) not in listed}
    gone = sorted(p for p, _ in artifacts if not os.path.exists(p))
    for path in gone:
        logger.warning("artifact %s is no longer on disk; not sent", path)
    counts = {"refused": 0, "artifacts_missing_locally": len(gone)}
    for kind, missing in (("params", [(k, v) for k, v in merged["params"].items() if k not in run.data.params]),
                          ("tags", [(k, v) for k, v in merged["tags"].items() if run.data.tags.get(k) != v]),
                          ("metrics", [Metric(key, float(r["value"]), int(r["timestamp"]), step)
                                       for (key, step), r in latest.items() if step not in steps[key]]),
                          ("artifacts", sorted((a for a in artifacts if a[0] not in gone), key=str))):
        total = len(missing)
        refused = send_records(client, run_id, kind, missing, secrets)
        counts[kind], counts["refused"] = total - refused, counts["refused"] + refused
    return counts


def sync_run(run_dir: str, uri: str | None = None) -> dict[str, Any]:
    """Send the journal's records that the run lacks; returns counts of what was sent. A run never created (MLflow
    down from start to close) is created; one the journal says was closed and MLflow still shows RUNNING is
    terminated with the recorded status."""
    from mlflow.tracking import MlflowClient

    info = read_run_info(run_dir)
    if info is None:
        raise FileNotFoundError(f"{run_dir}: no mlflow_run.json, not a tracked run directory")
    uri = uri or info["uri"]
    if REDACTED in uri:
        logger.warning("the recorded tracking URI %s had credentials, which are never saved: pass --uri", uri)
    client, run_id, status = MlflowClient(tracking_uri=uri), info.get("run_id"), info.get("status")
    if not run_id:  # the store may differ from the one the run started against (a server's sqlite file)
        location = info.get("artifact_location") or resolve_artifact_location("", uri)
        run_id = open_run(client, RunTarget(uri, info["experiment"], info["run_name"], location))
        write_run_info(run_dir, {**info, "run_id": run_id})
        logger.info("created MLflow run %s for %s", run_id, run_dir)
    journal = read_records(run_dir), read_records(run_dir, EVENTS_FILE)
    report = {"run_id": run_id, **send_missing(client, run_id, *journal, known_secrets(uri)), "terminated": None}
    if status and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)
        report["terminated"] = status
    return report
