"""The markdown report of a comparison: a table per run, a table per method, the target rule.

The tables are padded so the same text reads in a terminal and renders as markdown.
"""
from __future__ import annotations

from typing import Sequence

from pipeline.compare.stats import BASELINE_POLICY, NOT_REACHED


def fmt(value: float | None, digits: int = 1, missing: str = "-") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def fmt_spread(s: dict | None, digits: int = 1, missing: str = "-") -> str:
    if s is None:
        return missing
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded so it also reads as plain text in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def runs_table(rows: Sequence[dict]) -> str:
    headers = ["run", "policy", "exit", "overs.", "seed", "time to target (s)",
               "samples to target", "final acc", "step (s)", "scoring share"]
    body = []
    for r in rows:
        reached = r["reached"]
        body.append([
            r["name"], r["policy"], r["exit_layer"], r["oversample"], r["seed"],
            fmt(r["time_to_target_s"], 1, "n/a") if reached else NOT_REACHED,
            fmt(r["samples_to_target"], 0, "n/a") if reached else NOT_REACHED,
            fmt(r["final_accuracy"], 4), fmt(r["mean_step_s"], 3), fmt(r["scoring_share"], 3),
        ])
    return markdown_table(headers, body)


def groups_table(groups: Sequence[dict], baseline: str = BASELINE_POLICY) -> str:
    headers = ["policy", "exit", "reached", "time to target (s) mean [min..max]",
               f"time / {baseline}", "samples to target mean [min..max]",
               f"samples / {baseline}", "final acc mean [min..max]", "step (s)", "scoring share"]
    body = [[g["policy"], g["exit_layer"], f"{g['reached']}/{g['runs']}",
             fmt_spread(g["time_to_target_s"], 1, NOT_REACHED), fmt(g["time_ratio"], 2),
             fmt_spread(g["samples_to_target"], 0, NOT_REACHED), fmt(g["samples_ratio"], 2),
             fmt_spread(g["final_accuracy"], 4), fmt(g["mean_step_s"], 3),
             fmt(g["scoring_share"], 3)] for g in groups]
    return markdown_table(headers, body)


def report_markdown(target: float, rule: str, rows: Sequence[dict], groups: Sequence[dict],
                    baseline: str = BASELINE_POLICY) -> str:
    return "\n".join([
        "# Run comparison", "",
        f"Target eval accuracy: **{target:.4f}** ({rule}).", "",
        "Time and samples to target are the progress counters at the first eval whose accuracy "
        "is >= the target; a target never reached is shown as such, never interpolated.", "",
        "## Runs", "", runs_table(rows), "",
        "## By policy and exit layer (spread over seeds)", "",
        f"Means over the runs that reached the target; ratios to {baseline}'s mean where "
        f"{baseline} reached it.", "", groups_table(groups, baseline), "",
    ])
