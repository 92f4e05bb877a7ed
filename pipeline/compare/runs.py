"""Reading training runs from MLflow and logging the comparison run.

Reads the metric, param and tag names fixed in docs/ARCHITECTURE.md section 2. MLflow itself is
imported by the caller (the client is passed in), so this module loads fast and its pure helpers
(`latest_per_step`, `is_training_run`) are tested without a store.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.compare.methods import MASK_ACCURACY, MASK_ACCURACY_REF, THROUGHPUT_KEYS
from pipeline.compare.stats import EvalPoint, RunData
from pipeline.errors import InputError
from pipeline.tracking import resolve_uri
logger = logging.getLogger(__name__)

KIND_TAG = "sift.kind"
PARAM_KEYS = {"policy": "select.policy", "exit_layer": "select.exit_layer",
              "oversample": "select.oversample", "seed": "train.seed"}
DERIVED_EXIT_KEY = "derived.exit_layer"
METRICS = ("eval/accuracy", MASK_ACCURACY)  # what --metric may choose; the first is the default
PROGRESS_KEYS = ("eval/train_time_s", "eval/samples_backpropagated")
SERIES_KEYS = ("time/step_s", "select/scoring_share", "probe/spearman", "probe/topk_overlap",
               MASK_ACCURACY, *THROUGHPUT_KEYS.values())


def tracking_uri(cli_uri: str | None) -> str:
    return resolve_uri(cli_uri or "")  # the store the training runs log to by default


def is_training_run(tags: dict[str, str]) -> bool:
    return tags.get(KIND_TAG, "train") == "train"


def latest_per_step(entries: Iterable[tuple[int, int, float]]) -> dict[int, float]:
    """(step, timestamp, value) -> {step: value}; a step logged twice (a resume): latest wins."""
    out: dict[int, tuple[int, float]] = {}
    for step, timestamp, value in entries:
        if step not in out or timestamp >= out[step][0]:
            out[step] = (timestamp, value)
    return {step: value for step, (_, value) in out.items()}


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return latest_per_step((m.step, m.timestamp, m.value)
                           for m in client.get_metric_history(run_id, key))


def load_run(client, run, metric: str = METRICS[0]) -> RunData:
    """Params, eval points of `metric` (joined on step with the progress counters) and the
    per-step series of one MLflow run."""
    params, logged = run.data.params, run.data.metrics
    data = RunData(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                   experiment_id=run.info.experiment_id,
                   derived_exit=params.get(DERIVED_EXIT_KEY),
                   mask_accuracy_ref=logged.get(MASK_ACCURACY_REF),
                   **{attr: params.get(key, "-") for attr, key in PARAM_KEYS.items()})
    acc, time_s, samples = (_history(client, data.run_id, k) if k in logged else {}
                            for k in (metric, *PROGRESS_KEYS))
    data.evals = [EvalPoint(step, acc[step], time_s.get(step), samples.get(step))
                  for step in sorted(acc)]
    if not acc:
        logger.warning("run %s logged no %s", data.name, metric)
    missing = sum(p.train_time_s is None for p in data.evals)
    if missing:
        logger.warning("run %s: %d evals without eval/train_time_s", data.name, missing)
    for key in SERIES_KEYS:
        if key in logged:
            data.series[key] = sorted(_history(client, data.run_id, key).items())
    return data


def find_runs(client, experiment: str | None, run_ids: Sequence[str] | None) -> list:
    """The training runs asked for (never `comparison` runs), oldest first."""
    if run_ids:
        from mlflow.exceptions import MlflowException

        try:
            runs = [client.get_run(rid) for rid in run_ids]
        except MlflowException as err:
            raise InputError(f"cannot read the run: {err.message}", "--runs", "pass run ids from the MLflow UI") from None
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise InputError(f"no MLflow experiment named {experiment!r}", "--experiment",
                             "check the name (tracking.experiment of the runs) and --uri")
        runs, token = [], None
        while True:
            page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    skipped = [r.info.run_id for r in runs if not is_training_run(r.data.tags)]
    if skipped:
        logger.info("skipping %d non-training run(s): %s", len(skipped), ", ".join(skipped))
    return sorted((r for r in runs if is_training_run(r.data.tags)),
                  key=lambda r: r.info.start_time or 0)


def log_comparison(client, experiment_id: str, files: Sequence[Path], target: float, rule: str,
                   n_runs: int, metric: str = METRICS[0]) -> str:
    """A new run tagged sift.kind=comparison holding the table and plots as artifacts."""
    run = client.create_run(experiment_id, run_name="comparison", tags={KIND_TAG: "comparison"})
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "compare.metric", metric)
        client.log_param(run_id, "compare.target", f"{target:.6f}")
        client.log_param(run_id, "compare.target_rule", rule[:500])
        client.log_param(run_id, "compare.n_runs", n_runs)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="comparison")
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id
