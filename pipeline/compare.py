"""Compare training runs from MLflow: time and samples to a target eval accuracy, plus plots.

    python -m pipeline.compare --experiment NAME [--target auto|ACC] [--out DIR] [--no-log]
    python -m pipeline.compare --runs ID [ID ...] --uri sqlite:///path/mlflow.db

Reads the metric, param and tag names fixed in docs/ARCHITECTURE.md section 2. The arithmetic is
pure functions on lists of `EvalPoint` (tested without MLflow); the MLflow reading and the
comparison run are thin wrappers around them. A target a run never reached stays "not reached":
nothing is interpolated between evals.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.tracking import resolve_uri

logger = logging.getLogger(__name__)

KIND_TAG = "sift.kind"
BASELINE_POLICY = "vanilla"
NOT_REACHED = "not reached"
PARAM_KEYS = {"policy": "select.policy", "exit_layer": "select.exit_layer",
              "oversample": "select.oversample", "seed": "train.seed"}
EVAL_KEYS = ("eval/accuracy", "eval/train_time_s", "eval/samples_backpropagated")
SERIES_KEYS = ("time/step_s", "select/scoring_share", "probe/spearman", "probe/topk_overlap")


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: the accuracy and the progress counters logged at the same step."""
    step: int
    accuracy: float
    train_time_s: float | None = None
    samples_backpropagated: float | None = None


@dataclass
class RunData:
    run_id: str
    name: str
    experiment_id: str
    policy: str = "-"
    exit_layer: str = "-"
    oversample: str = "-"
    seed: str = "-"
    evals: list[EvalPoint] = field(default_factory=list)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> (step, v)

    @property
    def group(self) -> tuple[str, str]:
        return (self.policy, self.exit_layer)


@dataclass(frozen=True)
class Spread:
    mean: float
    min: float
    max: float
    std: float
    n: int


# ----------------------------------------------------------------------------- pure arithmetic
def first_reaching(evals: Sequence[EvalPoint], target: float) -> EvalPoint | None:
    """The first eval (in step order) whose accuracy is >= target; None if none is."""
    for point in sorted(evals, key=lambda p: p.step):
        if point.accuracy >= target:
            return point
    return None


def time_to_target(evals: Sequence[EvalPoint], target: float) -> float | None:
    """Training seconds at the first eval that reached the target (None: not reached)."""
    point = first_reaching(evals, target)
    return None if point is None else point.train_time_s


def samples_to_target(evals: Sequence[EvalPoint], target: float) -> float | None:
    """Samples backpropagated at the first eval that reached the target (None: not reached)."""
    point = first_reaching(evals, target)
    return None if point is None else point.samples_backpropagated


def final_accuracy(evals: Sequence[EvalPoint]) -> float | None:
    return max(evals, key=lambda p: p.step).accuracy if evals else None


def accuracy_at_time(evals: Sequence[EvalPoint], time_s: float) -> float | None:
    """Accuracy of the last eval at or before `time_s` of training time (None if none was)."""
    before = [p for p in evals if p.train_time_s is not None and p.train_time_s <= time_s]
    return max(before, key=lambda p: p.train_time_s).accuracy if before else None


def auto_target(baseline_curves: Sequence[Sequence[EvalPoint]], fraction: float = 0.8) -> float:
    """Min over baseline runs of the accuracy each reached at `fraction` of its final eval time."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"target fraction must be in (0, 1], got {fraction}")
    reached = []
    for evals in baseline_curves:
        times = [p.train_time_s for p in evals if p.train_time_s is not None]
        acc = accuracy_at_time(evals, fraction * max(times)) if times else None
        if acc is not None:
            reached.append(acc)
    if not reached:
        raise ValueError("no baseline run has an eval at or before the target fraction of its time")
    return min(reached)


def group_order(group: tuple[str, str], baseline: str = BASELINE_POLICY) -> tuple:
    """Sort key for (policy, exit layer): the baseline first, then by policy, exit layer as int."""
    policy, exit_layer = group
    layer = (0, int(exit_layer), "") if exit_layer.isdigit() else (1, 0, exit_layer)
    return (policy != baseline, policy, layer)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def spread(values: Sequence[float | None]) -> Spread | None:
    """Mean, min, max and population std of the values that are present (None if none is)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Spread(statistics.fmean(present), min(present), max(present),
                  statistics.pstdev(present), len(present))


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


# ----------------------------------------------------------------------------- rows and groups
def run_row(run: RunData, target: float) -> dict:
    """One table row: the numbers `compare` reports for a run (None where absent)."""
    point = first_reaching(run.evals, target)
    return {
        "run_id": run.run_id, "name": run.name, "policy": run.policy,
        "exit_layer": run.exit_layer, "oversample": run.oversample, "seed": run.seed,
        "reached": point is not None,
        "step_to_target": None if point is None else point.step,
        "time_to_target_s": None if point is None else point.train_time_s,
        "samples_to_target": None if point is None else point.samples_backpropagated,
        "final_accuracy": final_accuracy(run.evals),
        "evals": len(run.evals),
        "mean_step_s": mean_or_none([v for _, v in run.series.get("time/step_s", [])]),
        "scoring_share": mean_or_none([v for _, v in run.series.get("select/scoring_share", [])]),
    }


def group_rows(rows: Sequence[dict], baseline: str = BASELINE_POLICY) -> list[dict]:
    """Per (policy, exit layer): spread over seeds and ratios to the baseline's means.

    Means of time/samples to target are over the runs that reached it (`reached` says k/n);
    ratios are given only where the baseline reached the target.
    """
    base = [r for r in rows if r["policy"] == baseline]
    base_time = mean_or_none([r["time_to_target_s"] for r in base])
    base_samples = mean_or_none([r["samples_to_target"] for r in base])
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["exit_layer"]), []).append(r)
    out = []
    for (policy, exit_layer), members in sorted(
            groups.items(), key=lambda item: group_order(item[0], baseline)):
        time_s = spread([r["time_to_target_s"] for r in members])
        samples = spread([r["samples_to_target"] for r in members])
        out.append({
            "policy": policy, "exit_layer": exit_layer, "runs": len(members),
            "reached": sum(r["reached"] for r in members),
            "time_to_target_s": _asdict_or_none(time_s),
            "samples_to_target": _asdict_or_none(samples),
            "time_ratio": ratio(None if time_s is None else time_s.mean, base_time),
            "samples_ratio": ratio(None if samples is None else samples.mean, base_samples),
            "final_accuracy": _asdict_or_none(spread([r["final_accuracy"] for r in members])),
            "mean_step_s": mean_or_none([r["mean_step_s"] for r in members]),
            "scoring_share": mean_or_none([r["scoring_share"] for r in members]),
        })
    return out


def _asdict_or_none(s: Spread | None) -> dict | None:
    return None if s is None else asdict(s)


# ----------------------------------------------------------------------------- MLflow
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


def load_run(client, run) -> RunData:
    """Params, eval points (joined on step) and per-step series of one MLflow run."""
    params, logged = run.data.params, run.data.metrics
    data = RunData(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                   experiment_id=run.info.experiment_id,
                   **{attr: params.get(key, "-") for attr, key in PARAM_KEYS.items()})
    acc, time_s, samples = (_history(client, data.run_id, k) if k in logged else {}
                            for k in EVAL_KEYS)
    data.evals = [EvalPoint(step, acc[step], time_s.get(step), samples.get(step))
                  for step in sorted(acc)]
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
            raise SystemExit(f"cannot read run: {err.message}") from err
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"no MLflow experiment named {experiment!r}")
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


def log_comparison(client, experiment_id: str, files: Sequence[Path],
                   target: float, rule: str, n_runs: int) -> str:
    """A new run tagged sift.kind=comparison holding the table and plots as artifacts."""
    run = client.create_run(experiment_id, run_name="comparison", tags={KIND_TAG: "comparison"})
    run_id = run.info.run_id
    try:
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


# ----------------------------------------------------------------------------- CLI
def resolve_target(spec: str, fraction: float, runs: Sequence[RunData],
                   baseline: str = BASELINE_POLICY) -> tuple[float, str]:
    """(target, the rule in words) from `--target` ("auto" or a number)."""
    if spec != "auto":
        return float(spec), "given with --target"
    base = [r for r in runs if r.policy == baseline]
    if not base:
        raise SystemExit(f"--target auto needs {baseline} runs; none found (pass --target ACC)")
    try:
        target = auto_target([r.evals for r in base], fraction)
    except ValueError as err:
        raise SystemExit(f"--target auto: {err} (pass --target ACC)") from err
    rule = (f"auto: min over {len(base)} {baseline} run(s) of the eval accuracy at the last eval "
            f"at or before {fraction:.0%} of the run's final eval/train_time_s")
    return target, rule


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment name: all its training runs")
    which.add_argument("--runs", nargs="+", metavar="ID", help="MLflow run ids")
    p.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                 "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--target", default="auto",
                   help="target eval accuracy, a number in (0, 1] or 'auto' (default)")
    p.add_argument("--target-fraction", type=float, default=0.8,
                   help="for --target auto: fraction of the baseline's training time (0.8)")
    p.add_argument("--baseline", default=BASELINE_POLICY,
                   help="policy the ratios and the auto target refer to (vanilla)")
    p.add_argument("--out", type=Path, default=Path("compare_out"), help="output directory")
    p.add_argument("--no-log", action="store_true", help="do not log a comparison run to MLflow")
    args = p.parse_args(argv)
    if args.target != "auto":
        try:
            float(args.target)
        except ValueError:
            p.error(f"--target must be a number or 'auto', got {args.target!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mlflow.tracking import MlflowClient  # imported here: the pure part needs no MLflow

    from pipeline.compare_plots import report_markdown, write_plots

    client = MlflowClient(tracking_uri(args.uri))
    runs = [load_run(client, r) for r in find_runs(client, args.experiment, args.runs)]
    if not runs:
        raise SystemExit("no training runs to compare")
    target, rule = resolve_target(args.target, args.target_fraction, runs, args.baseline)
    rows = [run_row(r, target) for r in runs]
    groups = group_rows(rows, args.baseline)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = report_markdown(target, rule, rows, groups, args.baseline)
    (out / "comparison.md").write_text(report)
    (out / "comparison.json").write_text(json.dumps(
        {"target": target, "target_rule": rule, "baseline": args.baseline,
         "runs": rows, "groups": groups}, indent=2))
    plots = write_plots(runs, target, out, args.baseline)
    print(report)
    print(f"plots and tables in {out}:")
    for path in [out / "comparison.md", out / "comparison.json", *plots]:
        print(f"  {path}")

    if not args.no_log:
        experiments = {r.experiment_id for r in runs}
        if len(experiments) > 1:
            logger.warning("runs span %d experiments; logging to the first run's", len(experiments))
        files = [out / "comparison.md", out / "comparison.json", *plots]
        run_id = log_comparison(client, runs[0].experiment_id, files, target, rule, len(runs))
        print(f"logged comparison run {run_id}: {client.get_run(run_id).info.artifact_uri}"
              "/comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
