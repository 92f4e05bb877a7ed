"""Runs as table rows, rows grouped into methods, and each method set against the baseline.

A method is a policy, or "policy@exit" where the exit layer is a knob (`stats.method_name`); its
seeds are what tells signal from noise, so each method gets the mean and 95% interval over its
seeds and a Welch test against the baseline's seeds. Pure functions on plain dicts, as written to
comparison.json.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

from pipeline.compare.stats import (
    BASELINE_POLICY, RunData, Spread, final_accuracy, first_reaching, last_value, mean_or_none,
    method_name, ratio, spread, welch,
)

MASK_ACCURACY = "eval/mask_accuracy"
MASK_ACCURACY_REF = "eval/mask_accuracy_ref"
# row field -> the metric whose mean over the run's logging windows it holds
THROUGHPUT_KEYS = {"samples_per_s": "throughput/samples_per_s",
                   "tokens_per_s": "throughput/tokens_per_s",
                   "mfu": "throughput/mfu", "mfu_backprop": "throughput/mfu_backprop"}
MEAN_KEYS = {"mean_step_s": "time/step_s", "scoring_share": "select/scoring_share",
             **THROUGHPUT_KEYS}


def method_order(method: str, baseline: str = BASELINE_POLICY) -> tuple:
    """Sort key for a method: the baseline first, then by policy, then exit layer as a number."""
    policy, _, layer = method.partition("@")
    layer_key = (0, int(layer), "") if layer.isdigit() else (1, 0, layer)
    return (method != baseline, policy, layer_key)


def run_row(run: RunData, target: float) -> dict:
    """One table row: the numbers `compare` reports for a run (None where absent)."""
    point = first_reaching(run.evals, target)
    return {
        "run_id": run.run_id, "name": run.name, "method": run.method, "policy": run.policy,
        "exit_layer": run.exit_layer, "oversample": run.oversample, "seed": run.seed,
        "reached": point is not None,
        "step_to_target": None if point is None else point.step,
        "time_to_target_s": None if point is None else point.train_time_s,
        "samples_to_target": None if point is None else point.samples_backpropagated,
        "final_accuracy": final_accuracy(run.evals),
        "final_mask_accuracy": last_value(run.series.get(MASK_ACCURACY, [])),
        "mask_accuracy_ref": run.mask_accuracy_ref,
        "evals": len(run.evals),
        **{name: mean_or_none([v for _, v in run.series.get(key, [])])
           for name, key in MEAN_KEYS.items()},
    }


def row_method(row: dict) -> str:
    """The row's method; rows written before methods existed are named from policy and exit."""
    return row.get("method") or method_name(row["policy"], row["exit_layer"])


def versus_baseline(method: str, values: Sequence[float], baseline: str,
                    base: Sequence[float]) -> dict:
    """Whether a method's seeds differ from the baseline's beyond their spread, in one phrase.

    `values` and `base` are the seeds that reached the target. The phrase is what the report
    prints; `welch` holds the test's numbers (None where no test was possible).
    """
    test = welch(values, base)
    if not values or not base:
        who = method if not values else baseline
        text = f"no comparison: no {who} seed reached the target"
    elif test is None:
        text = "one seed only: not evidence"
    else:
        numbers = (f"Welch t={test.t:.2f} on {test.df:.1f} df, 5% critical |t| {test.critical:.2f}"
                   if test.t is not None else "no spread on either side" if test.significant
                   else "the same value on every seed")
        text = (f"outside the noise ({numbers})" if test.significant
                else f"within the spread ({numbers})")
    return {"text": text, "welch": None if test is None else asdict(test)}


def group_rows(rows: Sequence[dict], baseline: str = BASELINE_POLICY) -> list[dict]:
    """One summary per method, the baseline first: spread and 95% interval over seeds, ratios of
    the means to the baseline's, and a Welch test against the baseline's seeds.

    Means and intervals of time/samples to target are over the runs that reached it (`reached`
    says k of n); ratios and tests need the baseline to have reached it.
    """
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(row_method(r), []).append(r)
    base = by_method.get(baseline, [])
    return [method_summary(method, by_method[method], base, baseline)
            for method in sorted(by_method, key=lambda m: method_order(m, baseline))]


def _present(rows: Sequence[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def _asdict_or_none(s: Spread | None) -> dict | None:
    return None if s is None else asdict(s)


def method_summary(method: str, members: Sequence[dict], base: Sequence[dict],
                   baseline: str = BASELINE_POLICY) -> dict:
    """The summary of one method's runs (`members`) against the baseline's runs (`base`)."""
    out = {"method": method, "policy": members[0]["policy"],  # exit_layer: as the runs logged it
           "exit_layer": ",".join(sorted({str(r["exit_layer"]) for r in members})),
           "runs": len(members), "reached": sum(bool(r["reached"]) for r in members)}
    for key, ratio_key, versus_key in (("time_to_target_s", "time_ratio", "time_vs_baseline"),
                                       ("samples_to_target", "samples_ratio",
                                        "samples_vs_baseline")):
        values, base_values = _present(members, key), _present(base, key)
        out[key] = _asdict_or_none(spread(values))
        out[ratio_key] = ratio(mean_or_none(values), mean_or_none(base_values))
        out[versus_key] = (None if method == baseline
                           else versus_baseline(method, values, baseline, base_values))
    out["final_accuracy"] = _asdict_or_none(spread(_present(members, "final_accuracy")))
    for key in ("final_mask_accuracy", "mask_accuracy_ref", *MEAN_KEYS):
        out[key] = mean_or_none(_present(members, key))
    return out
