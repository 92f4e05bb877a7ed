"""The arithmetic of a comparison: eval curves in, times and samples to a target out, and how much
of a difference between methods is noise.

Pure functions on lists of `EvalPoint` and on plain numbers, so they are tested without MLflow or
matplotlib and the CLI's `--help` does not pay for importing either. A target a run never reached
stays "not reached": nothing is interpolated between evals.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

BASELINE_POLICY = "vanilla"
NOT_REACHED = "not reached"
# Policies whose select.exit_layer is not a knob: vanilla and random score nothing, exact and
# selective_backprop score at the last layer whatever the param says. Their runs are one method.
# (pipeline.sift.policies.POLICIES says the same with scored_at != "exit"; a test keeps the two
# equal, and compare does not import that table because it imports torch.)
FIXED_EXIT_POLICIES = frozenset({"vanilla", "random", "exact", "selective_backprop"})
NO_EXIT = ("", "-")

# Two-sided 95% quantiles of Student's t (0.975 quantile) by degrees of freedom; math.inf is the
# normal limit. Between entries the next lower df is used, which widens an interval slightly
# rather than narrowing it (and keeps scipy out of the dependencies).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
        25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000,
        120: 1.980, math.inf: 1.960}


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: the target metric's value and the progress counters logged at that step
    (`accuracy` holds whichever metric the comparison is on, `--metric`)."""
    step: int
    accuracy: float
    train_time_s: float | None = None
    samples_backpropagated: float | None = None


def method_name(policy: str, exit_layer: str | None) -> str:
    """'policy@exit' where the exit layer is a knob of the policy, else the policy name alone.

    Runs are compared per method: sift at exit 1 and at exit 2 are different methods, while a
    vanilla run's select.exit_layer param is a default nobody chose and must not split vanilla.
    """
    if policy in FIXED_EXIT_POLICIES or exit_layer is None or exit_layer in NO_EXIT:
        return policy
    return f"{policy}@{exit_layer}"


@dataclass
class RunData:
    run_id: str
    name: str
    experiment_id: str
    policy: str = "-"
    exit_layer: str = "-"                    # the select.exit_layer param, as logged
    oversample: str = "-"
    seed: str = "-"
    derived_exit: str | None = None          # derived.exit_layer: the exit that ran (None: absent)
    mask_accuracy_ref: float | None = None   # eval/mask_accuracy_ref: the context-free level
    evals: list[EvalPoint] = field(default_factory=list)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> (step, v)

    @property
    def group(self) -> tuple[str, str]:
        """(policy, select.exit_layer) as logged; `method` is what runs are compared by."""
        return (self.policy, self.exit_layer)

    @property
    def method(self) -> str:
        """The method this run measures, from the exit layer that ran when the trainer logged it."""
        exit_layer = self.exit_layer if self.derived_exit is None else self.derived_exit
        return method_name(self.policy, exit_layer)


@dataclass(frozen=True)
class Spread:
    """Values over seeds: mean, range, population std (`std`), and where n >= 2 the sample std
    (`sd`, n-1) and the 95% Student-t confidence interval of the mean."""
    mean: float
    min: float
    max: float
    std: float
    n: int
    sd: float | None = None
    ci95_low: float | None = None
    ci95_high: float | None = None


@dataclass(frozen=True)
class Welch:
    """Welch's two-sample t-test at 5% (two-sided): unequal variances, Satterthwaite df.
    t, df and critical are None when neither side varies (there is no t to compute)."""
    t: float | None
    df: float | None
    critical: float | None
    significant: bool


# ----------------------------------------------------------------------------- curves
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


def last_value(series: Sequence[tuple[int, float]]) -> float | None:
    """The value at the highest step of a (step, value) series (None if it is empty)."""
    return max(series)[1] if series else None


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


# ----------------------------------------------------------------------------- noise
def mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def t_quantile_975(df: float) -> float:
    """Student t's 0.975 quantile at `df` degrees of freedom (>= 1), from T975: the next lower
    tabulated df, so a fractional Welch df gives a slightly conservative critical value."""
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T975[max(k for k in T975 if k <= df)]


def spread(values: Sequence[float | None]) -> Spread | None:
    """Mean, range and std of the values that are present, with the 95% confidence interval of
    the mean (t with n-1 df) when there are two or more (None if no value is present)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    n, mean = len(present), statistics.fmean(present)
    base = (mean, min(present), max(present), statistics.pstdev(present), n)
    if n < 2:
        return Spread(*base)
    sd = statistics.stdev(present)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Spread(*base, sd=sd, ci95_low=mean - half, ci95_high=mean + half)


def welch(a: Sequence[float], b: Sequence[float]) -> Welch | None:
    """Welch's t-test of mean(a) vs mean(b) at 5%; None with fewer than two values on a side.

    Chosen over "the intervals do not overlap", which with two or three seeds almost never
    happens even for real differences (it amounts to a test at well under 1%). When neither side
    varies at all, any difference in the means counts as significant.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return Welch(None, None, None, diff != 0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    df = max(df, min(len(a), len(b)) - 1)  # its lower bound, lost to rounding at times
    t = diff / math.sqrt(va + vb)
    critical = t_quantile_975(df)
    return Welch(t, df, critical, abs(t) > critical)


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference
