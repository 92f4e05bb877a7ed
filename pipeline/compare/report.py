"""The markdown report of a comparison: the target rule, a table per run, a table per method with
95% intervals over seeds, one plain line per method against the baseline, and the regime.

The report is written for a reader who will otherwise take "time / vanilla 0.47" as a result: it
says how many seeds back each number, whether a difference is outside the noise, and whether the
runs were still on the MLM plateau. The tables are padded so the same text reads in a terminal
and renders as markdown.
"""
from __future__ import annotations

from typing import Sequence

from pipeline.compare.methods import MASK_ACCURACY, MASK_ACCURACY_REF
from pipeline.compare.stats import BASELINE_POLICY, NOT_REACHED

# Final [MASK] accuracy below this multiple of the context-free (most-frequent-token) accuracy
# counts as the plateau: the model predicts a [MASK] from word frequency, not from its context,
# so the samples with the largest losses are those with rare words, whatever the method.
PLATEAU_RATIO = 1.25
NO_INTERVAL = "1 seed: no interval"
THROUGHPUT_COLUMNS = (("step (s)", "mean_step_s", 3), ("scoring share", "scoring_share", 3),
                      ("samples/s", "samples_per_s", 1), ("tokens/s", "tokens_per_s", 0),
                      ("MFU", "mfu", 3), ("MFU backprop", "mfu_backprop", 3))


def fmt(value: float | None, digits: int = 1, missing: str = "-") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def fmt_spread(s: dict | None, digits: int = 1, missing: str = "-") -> str:
    """'mean [min..max]' (the mean alone for one value)."""
    if s is None:
        return missing
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"


def fmt_interval(s: dict | None, digits: int = 1, missing: str = "-") -> str:
    """'mean [95% CI low..high]', or the mean and why there is no interval for one value."""
    if s is None:
        return missing
    if s.get("ci95_low") is None:
        return f"{s['mean']:.{digits}f} ({NO_INTERVAL})"
    return f"{s['mean']:.{digits}f} [{s['ci95_low']:.{digits}f}..{s['ci95_high']:.{digits}f}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded so it also reads as plain text in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _throughput_cells(row: dict) -> list[str]:
    return [fmt(row.get(key), digits) for _, key, digits in THROUGHPUT_COLUMNS]


def runs_table(rows: Sequence[dict], metric: str = "eval/accuracy") -> str:
    headers = ["run", "method", "overs.", "seed", "time to target (s)", "backprops to target",
               f"final {metric}", *(h for h, _, _ in THROUGHPUT_COLUMNS)]
    body = []
    for r in rows:
        reached = r["reached"]
        body.append([
            r["name"], r.get("method", r["policy"]), r["oversample"], r["seed"],
            fmt(r["time_to_target_s"], 1, "n/a") if reached else NOT_REACHED,
            fmt(r["samples_to_target"], 0, "n/a") if reached else NOT_REACHED,
            fmt(r["final_accuracy"], 4), *_throughput_cells(r),
        ])
    return markdown_table(headers, body)


def groups_table(groups: Sequence[dict], baseline: str = BASELINE_POLICY,
                 metric: str = "eval/accuracy") -> str:
    """Per method: seeds that reached the target, means with 95% intervals, ratios of means."""
    headers = ["method", "reached", "time to target (s) mean [95% CI]", f"time / {baseline}",
               "backprops to target mean [95% CI]", f"backprops / {baseline}",
               f"final {metric} mean [min..max]"]
    body = [[g["method"], f"{g['reached']}/{g['runs']}",
             fmt_interval(g["time_to_target_s"], 1, NOT_REACHED), fmt(g["time_ratio"], 2),
             fmt_interval(g["samples_to_target"], 0, NOT_REACHED), fmt(g["samples_ratio"], 2),
             fmt_spread(g["final_accuracy"], 4)] for g in groups]
    return markdown_table(headers, body)


def throughput_table(groups: Sequence[dict]) -> str:
    """Per method: step time, scoring share and throughput, means over its runs, '-' where its
    runs did not log them."""
    return markdown_table(["method", *(h for h, _, _ in THROUGHPUT_COLUMNS)],
                          [[g["method"], *_throughput_cells(g)] for g in groups])


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def baseline_line(g: dict, baseline: str = BASELINE_POLICY) -> str:
    """One method against the baseline in one line: the ratios of the means and whether each
    difference is outside the noise (one phrase for both where neither could be tested)."""
    time_ratio, samples_ratio = _ratio_text(g["time_ratio"]), _ratio_text(g["samples_ratio"])
    time_text, samples_text = g["time_vs_baseline"]["text"], g["samples_vs_baseline"]["text"]
    untested = g["time_vs_baseline"]["welch"] is None and g["samples_vs_baseline"]["welch"] is None
    if untested and time_text == samples_text:
        return (f"- {g['method']} vs {baseline}: {time_text} (time to target {time_ratio}, "
                f"backprops to target {samples_ratio})")
    return (f"- {g['method']} vs {baseline}: time to target {time_ratio}, {time_text}; "
            f"backprops to target {samples_ratio}, {samples_text}")


def _regime_missing(group: dict) -> list[str]:
    """The metrics a method's regime needs that its runs did not log (a zero reference counts)."""
    return [key for key, field in ((MASK_ACCURACY_REF, "mask_accuracy_ref"),
                                   (MASK_ACCURACY, "final_mask_accuracy")) if not group.get(field)]


def regime_lines(groups: Sequence[dict]) -> list[str]:
    """Each method's final [MASK] accuracy against the context-free reference, in words.

    On the plateau a loss-ranked selection keeps rare words rather than hard examples, so a
    comparison there says little about selection in general; the reader needs to know which.
    """
    lines, missing = [], {}
    for g in groups:
        if _regime_missing(g):
            missing[g["method"]] = _regime_missing(g)
            lines.append(f"regime unknown for {g['method']}: "
                         f"no {' or '.join(missing[g['method']])}")
            continue
        acc, ref = g["final_mask_accuracy"], g["mask_accuracy_ref"]
        times = acc / ref
        where = ("still on the plateau, where a high loss means a rare word"
                 if times < PLATEAU_RATIO else
                 "past the plateau, where [MASK] tokens are predicted from their context")
        lines.append(f"regime: {g['method']} [MASK] accuracy {acc:.3f} vs context-free "
                     f"{ref:.3f} ({times:.2f}x): {where}")
    if groups and len(missing) == len(groups):
        keys = [k for k in (MASK_ACCURACY_REF, MASK_ACCURACY)
                if any(k in m for m in missing.values())]
        return [f"regime unknown: the runs did not log {' and '.join(keys)}"]
    return lines


def report_markdown(target: float, rule: str, rows: Sequence[dict], groups: Sequence[dict],
                    baseline: str = BASELINE_POLICY, metric: str = "eval/accuracy") -> str:
    return "\n".join([
        "# Run comparison", "",
        f"Target {metric}: **{target:.4f}** ({rule}).", "",
        "Time and backprops (samples backpropagated) to target are the progress counters at the "
        f"first eval whose {metric} is >= the target; a target never reached is shown as such, "
        "never interpolated.", "",
        "## Runs", "", runs_table(rows, metric), "",
        "## By method (mean and 95% interval over seeds)", "",
        "Means and intervals over the seeds that reached the target (Student t, n-1 degrees of "
        f"freedom); ratios of the means to {baseline}'s where {baseline} reached it.", "",
        groups_table(groups, baseline, metric), "",
        f"## Against {baseline}", "",
        "A difference is outside the noise when Welch's t-test (unequal variances) rejects equal "
        "means at 5%; with fewer than two seeds at the target on either side there is no test.", "",
        *([baseline_line(g, baseline) for g in groups if g.get("time_vs_baseline")]
          or [f"(no method besides {baseline})"]), "",
        "## Regime", "", *regime_lines(groups), "",
        "## Throughput by method (means over the runs' logging windows)", "",
        throughput_table(groups), "",
    ])
