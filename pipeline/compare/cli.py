"""Compare training runs from MLflow: time and backprops to a target eval metric, per method
with 95% intervals over seeds, whether each method differs from the baseline beyond the noise,
and the regime the runs were in (on the MLM plateau or past it).

    python -m pipeline.compare --experiment NAME [--metric eval/mask_accuracy]
                               [--target auto|ACC] [--out DIR] [--no-log]
    python -m pipeline.compare --runs ID [ID ...] --uri sqlite:///path/mlflow.db

Writes comparison.md, comparison.json and PNG plots into --out and, unless --no-log, logs them as
artifacts of a new run tagged sift.kind=comparison. MLflow and matplotlib are imported in `main`,
after the arguments are parsed, so `--help` and a bad option answer at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from pipeline.compare.methods import group_rows, run_row
from pipeline.compare.report import regime_lines, report_markdown
from pipeline.compare.runs import METRICS, find_runs, load_run, log_comparison, tracking_uri
from pipeline.compare.stats import BASELINE_POLICY, RunData, auto_target
from pipeline.errors import InputError

logger = logging.getLogger(__name__)


def resolve_target(spec: str, fraction: float, runs: Sequence[RunData],
                   baseline: str = BASELINE_POLICY, metric: str = METRICS[0]) -> tuple[float, str]:
    """(target, the rule in words) from `--target` ("auto" or a number), on `metric`, the metric
    the runs' `evals` hold."""
    if spec != "auto":
        return float(spec), "given with --target"
    base = [r for r in runs if r.method == baseline]
    if not base:
        raise InputError(f"no {baseline} runs to set an automatic target from", "--target auto",
                         "pass --target VALUE, or --baseline with a method the runs have")
    try:
        target = auto_target([r.evals for r in base], fraction)
    except ValueError as err:
        raise InputError(str(err), "--target auto", "pass --target VALUE, or train the baseline longer") from None
    rule = (f"auto: min over {len(base)} {baseline} run(s) of {metric} at the last eval "
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
    p.add_argument("--metric", choices=METRICS, default=METRICS[0],
                   help=f"the eval metric the target is on (default {METRICS[0]}; "
                        "eval/mask_accuracy: at the [MASK] positions alone, no copying)")
    p.add_argument("--target", default="auto",
                   help="target value of --metric, a number in (0, 1] or 'auto' (default)")
    p.add_argument("--target-fraction", type=float, default=0.8,
                   help="for --target auto: fraction of the baseline's training time (0.8)")
    p.add_argument("--baseline", default=BASELINE_POLICY,
                   help="method ('policy' or 'policy@exit') the ratios, tests and the auto "
                        "target refer to (vanilla)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/compare/<experiment>, which git ignores)")
    p.add_argument("--no-log", action="store_true", help="do not log a comparison run to MLflow")
    args = p.parse_args(argv)
    if args.target != "auto":
        try:
            float(args.target)
        except ValueError:
            p.error(f"--target must be a number or 'auto', got {args.target!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0, or 2 with one `error: <what> (<where>): <what to do>` line for bad input."""
    args = parse_args(argv)
    try:
        return _compare(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mlflow.tracking import MlflowClient  # imported here: --help needs neither MLflow

    from pipeline.compare.plots import write_plots  # nor matplotlib

    client = MlflowClient(tracking_uri(args.uri))
    runs = [load_run(client, r, args.metric)
            for r in find_runs(client, args.experiment, args.runs)]
    if not runs:
        raise InputError("no training runs to compare", args.experiment or "--runs",
                         "check the experiment name and --uri (the MLflow UI lists both)")
    if not any(r.evals for r in runs):
        raise InputError(f"no run logged {args.metric}", "--metric", "choose another metric, or runs that log it")
    target, rule = resolve_target(args.target, args.target_fraction, runs, args.baseline,
                                  args.metric)
    rows = [run_row(r, target) for r in runs]
    groups = group_rows(rows, args.baseline)

    default = Path("runs") / "compare" / (args.experiment or f"runs-{args.runs[0][:8]}")
    out = (args.out or default).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = report_markdown(target, rule, rows, groups, args.baseline, args.metric)
    (out / "comparison.md").write_text(report)
    (out / "comparison.json").write_text(json.dumps(
        {"metric": args.metric, "target": target, "target_rule": rule, "baseline": args.baseline,
         "regime": regime_lines(groups), "runs": rows, "groups": groups}, indent=2))
    plots = write_plots(runs, target, out, args.baseline, args.metric)
    print(report)
    print(f"plots and tables in {out}:")
    for path in [out / "comparison.md", out / "comparison.json", *plots]:
        print(f"  {path}")

    if not args.no_log:
        experiments = {r.experiment_id for r in runs}
        if len(experiments) > 1:
            logger.warning("runs span %d experiments; logging to the first run's", len(experiments))
        files = [out / "comparison.md", out / "comparison.json", *plots]
        run_id = log_comparison(client, runs[0].experiment_id, files, target, rule, len(runs),
                                args.metric)
        print(f"logged comparison run {run_id}: {client.get_run(run_id).info.artifact_uri}"
              "/comparison")
    return 0

