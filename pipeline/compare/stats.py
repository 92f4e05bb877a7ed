"""The arithmetic of a comparison: eval curves in, times and samples to a target out.

Pure functions on lists of `EvalPoint` and on plain row dicts, so they are tested without MLflow
or matplotlib and the CLI's `--help` does not pay for importing either. A target a run never
reached stays "not reached": nothing is interpolated between evals.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Sequence

BASELINE_POLICY = "vanilla"
NOT_REACHED = "not reached"


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
