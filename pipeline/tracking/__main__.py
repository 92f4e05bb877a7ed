"""``python -m pipeline.tracking sync <run_dir> [--uri URI]``: sends what the run's journal holds and its MLflow run
lacks (`pipeline.tracking.sync`) and prints the counts as JSON. Exit 0: all sent; 2: not a tracked run directory,
or MLflow refused records (named in the log; they stay in the journal); 1 only for a bug."""

import argparse
import json
import logging
import sys

from pipeline.tracking.sync import sync_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    parser.add_argument("command", choices=["sync"], help="send the journaled records the MLflow run lacks")
    parser.add_argument("run_dir")
    parser.add_argument("--uri", help="tracking URI (default: the one recorded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = sync_run(args.run_dir, uri=args.uri)
    except FileNotFoundError:
        print(f"error: no mlflow_run.json, not a tracked run directory ({args.run_dir}): pass the run directory "
              "that training printed at start", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    if report["refused"]:
        print(f"error: MLflow refused {report['refused']} record(s) ({args.run_dir}): see the warnings above; "
              "they stay in the journal", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
