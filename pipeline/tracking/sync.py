"""Re-send what a run directory's journal holds and its MLflow run lacks (`tracking sync`).

Metrics are compared by (key, step) with the run's metric history, params by key, tags by value,
artifacts by name, so running sync twice sends nothing the second time. A run that was never
created (MLflow down from start to close) is created here. If the journal says the run was closed
and MLflow still shows it RUNNING, it is terminated with the recorded status.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking.journal import read_events, read_metrics, read_run_info, write_run_info
from pipeline.tracking.scrub import env_secrets, staged_artifact
from pipeline.tracking.sender import RunTarget, is_transient, open_run

logger = logging.getLogger(__name__)


def _send_chunks(send: Callable[[list[Any]], None], items: Sequence[Any], size: int) -> int:
    """Send in chunks; a chunk MLflow refuses is re-sent item by item. Returns items refused."""
    refused = 0
    for start in range(0, len(items), size):
        chunk = list(items[start:start + size])
        try:
            send(chunk)
            continue
        except Exception as exc:
            if is_transient(exc):
                raise
        for item in chunk:
            try:
                send([item])
            except Exception as exc:
                if is_transient(exc):
                    raise
                refused += 1
                logger.warning("MLflow refused %r: %s", getattr(item, "key", item), exc)
    return refused


def _merged(events: list[dict[str, Any]], kind: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for event in events:
        if event.get("kind") == kind:
            merged.update(event["data"])
    return merged


def missing_params(client: Any, run_id: str, events: list[dict[str, Any]]) -> dict[str, str]:
    """Journaled params the run lacks (a param MLflow already has keeps its first value)."""
    have = client.get_run(run_id).data.params
    wanted = _merged(events, "params")
    for key in sorted(k for k in wanted if k in have and have[k] != wanted[k]):
        logger.warning("param %r is %r in MLflow and %r in the journal; MLflow keeps the first",
                       key, have[key], wanted[key])
    return {k: v for k, v in wanted.items() if k not in have}


def missing_tags(client: Any, run_id: str, events: list[dict[str, Any]]) -> dict[str, str]:
    """Journaled tags (last value) that the run lacks or holds with another value."""
    have = client.get_run(run_id).data.tags
    return {k: v for k, v in _merged(events, "tags").items() if have.get(k) != v}


def _sync_params(client: Any, run_id: str, events: list[dict[str, Any]]) -> tuple[int, int]:
    from mlflow.entities import Param

    missing = [Param(k, v) for k, v in missing_params(client, run_id, events).items()]
    return len(missing), _send_chunks(lambda c: client.log_batch(run_id, params=c), missing, 100)


def _sync_tags(client: Any, run_id: str, events: list[dict[str, Any]]) -> tuple[int, int]:
    from mlflow.entities import RunTag

    missing = [RunTag(k, v) for k, v in missing_tags(client, run_id, events).items()]
    return len(missing), _send_chunks(lambda c: client.log_batch(run_id, tags=c), missing, 100)


def missing_metrics(client: Any, run_id: str, records: list[dict[str, Any]]) -> list[Any]:
    """Journal records whose (key, step) the run lacks; the last record wins for each pair."""
    from mlflow.entities import Metric

    latest = {(r["key"], int(r["step"])): r for r in records}
    steps_by_key: dict[str, set[int]] = {}
    for key in sorted({key for key, _ in latest}):
        steps_by_key[key] = {m.step for m in client.get_metric_history(run_id, key)}
    return [Metric(key, float(r["value"]), int(r["timestamp"]), step)
            for (key, step), r in latest.items() if step not in steps_by_key[key]]


def _sync_metrics(client: Any, run_id: str, run_dir: str) -> tuple[int, int]:
    missing = missing_metrics(client, run_id, read_metrics(run_dir))
    return len(missing), _send_chunks(lambda c: client.log_batch(run_id, metrics=c), missing, 1000)


def _artifact_present(client: Any, run_id: str, path: str, artifact_path: str | None) -> bool:
    name = Path(path).name
    wanted = f"{artifact_path}/{name}" if artifact_path else name
    return any(f.path == wanted for f in client.list_artifacts(run_id, artifact_path))


def _sync_artifacts(client: Any, run_id: str, events: list[dict[str, Any]]) -> tuple[int, int]:
    pairs = {(e["path"], e.get("artifact_path")) for e in events if e.get("kind") == "artifact"}
    secrets, sent, missing_local = env_secrets(), 0, 0
    for path, artifact_path in sorted(pairs, key=str):
        if _artifact_present(client, run_id, path, artifact_path):
            continue
        if not os.path.exists(path):
            missing_local += 1
            logger.warning("artifact %s is no longer on disk; not sent", path)
            continue
        with staged_artifact(path, secrets) as upload:
            client.log_artifact(run_id, upload, artifact_path)
        sent += 1
    return sent, missing_local


def _ensure_run(client: Any, run_dir: str, info: dict[str, Any], uri: str) -> str:
    if info.get("run_id"):
        return info["run_id"]
    from pipeline.tracking import resolve_artifact_location

    # the store may differ from the one the run was started against (e.g. a server's sqlite file)
    location = info.get("artifact_location") or resolve_artifact_location("", uri)
    target = RunTarget(uri=uri, experiment=info["experiment"], run_name=info["run_name"],
                       artifact_location=location)
    run_id = open_run(client, target)
    write_run_info(run_dir, {**info, "run_id": run_id})
    logger.info("created MLflow run %s for %s", run_id, run_dir)
    return run_id


def _sync_status(client: Any, run_id: str, info: dict[str, Any]) -> str | None:
    status = info.get("status")
    if status and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)
        return status
    return None


def sync_run(run_dir: str, uri: str | None = None) -> dict[str, Any]:
    """Send the journal's records that the run lacks; returns counts of what was sent."""
    from mlflow.tracking import MlflowClient

    info = read_run_info(run_dir)
    if info is None:
        raise FileNotFoundError(f"{run_dir}: no mlflow_run.json, not a tracked run directory")
    uri = uri or info["uri"]
    client = MlflowClient(tracking_uri=uri)
    run_id = _ensure_run(client, run_dir, info, uri)
    events = read_events(run_dir)
    params, params_refused = _sync_params(client, run_id, events)
    tags, tags_refused = _sync_tags(client, run_id, events)
    metrics, metrics_refused = _sync_metrics(client, run_id, run_dir)
    artifacts, missing_local = _sync_artifacts(client, run_id, events)
    return {"run_id": run_id, "params": params - params_refused, "tags": tags - tags_refused,
            "metrics": metrics - metrics_refused,
            "artifacts": artifacts, "artifacts_missing_locally": missing_local,
            "refused": params_refused + tags_refused + metrics_refused,
            "terminated": _sync_status(client, run_id, info)}
