"""Per-sample gain of one selection method over another, from the runs' own metrics (docs/RESULTS.md, the map).

    python benchmarks/per_sample_gain.py runs/study/runs/study-warm --method exact --baseline random [--json]

For each seed both methods ran: the method's eval/mask_accuracy at its last eval, against the baseline's
curve (eval/mask_accuracy over eval/samples_backpropagated, linearly interpolated) at the same number
of backpropagated samples. Two numbers per seed:
- gain: method's accuracy minus the baseline's at equal backprops (> 0: each backprop taught more);
- backprop ratio: the method's backprops / the baseline's backprops to the same accuracy (< 1: fewer
  backprops needed); None when the baseline never reached it.
Run directories are <dir>/<method>-s<seed>/metrics.jsonl, as benchmarks/study.py writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.study_diagnostics import read_journal  # noqa: E402


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(backpropagated samples, [MASK] accuracy) at each eval, in order."""
    journal = read_journal(run_dir)
    backprops = dict(journal.get("eval/samples_backpropagated", []))
    return [(backprops[step], accuracy) for step, accuracy in journal.get("eval/mask_accuracy", []) if step in backprops]


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve; None outside it."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def first_reach(points: list[tuple[float, float]], y: float) -> float | None:
    """The backprops at which the curve first reaches y (interpolated); None if never."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 < y <= y1:
            return x0 + (x1 - x0) * (y - y0) / (y1 - y0)
    return points[0][0] if points and points[0][1] >= y else None


def compare(runs: Path, method: str, baseline: str) -> dict:
    seeds = []
    for run in sorted(runs.glob(f"{method}-s*")):
        seed = run.name.rsplit("-s", 1)[1]
        base = runs / f"{baseline}-s{seed}"
        if not (base / "metrics.jsonl").is_file():
            continue
        mine, theirs = curve(run), curve(base)
        backprops, accuracy = mine[-1]
        at_equal = interpolate(theirs, backprops)
        reach = first_reach(theirs, accuracy)
        seeds.append({"seed": int(seed), "backprops": backprops, "accuracy": accuracy,
                      "baseline_accuracy_at_equal_backprops": at_equal,
                      "gain": None if at_equal is None else accuracy - at_equal,
                      "backprop_ratio": None if reach is None else backprops / reach})
    gains = [s["gain"] for s in seeds if s["gain"] is not None]
    ratios = [s["backprop_ratio"] for s in seeds if s["backprop_ratio"] is not None]
    return {"method": method, "baseline": baseline, "runs": str(runs), "seeds": seeds,
            "gain_mean": statistics.mean(gains) if gains else None,
            "gain_range": [min(gains), max(gains)] if gains else None,
            "backprop_ratio_mean": statistics.mean(ratios) if ratios else None,
            "backprop_ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "baseline_reached": f"{len(ratios)}/{len(seeds)}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="a directory of <method>-s<seed> run directories")
    p.add_argument("--method", required=True)
    p.add_argument("--baseline", default="random")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = p.parse_args()
    result = compare(args.runs, args.method, args.baseline)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for s in result["seeds"]:
        print(f"seed {s['seed']}: {args.method} {s['accuracy']:.4f} at {s['backprops']:.0f} backprops; {args.baseline} "
              f"there {fmt(s['baseline_accuracy_at_equal_backprops'], 4)}; gain {fmt(s['gain'], 4)}; "
              f"backprop ratio {fmt(s['backprop_ratio'], 2)}")
    g, r = result["gain_range"], result["backprop_ratio_range"]
    print(f"mean gain {fmt(result['gain_mean'], 4)} [{fmt(g and g[0], 4)}..{fmt(g and g[1], 4)}], "
          f"mean backprop ratio {fmt(result['backprop_ratio_mean'], 2)} [{fmt(r and r[0], 2)}..{fmt(r and r[1], 2)}] "
          f"(baseline reached the method's accuracy in {result['baseline_reached']} seeds)")


if __name__ == "__main__":
    main()
