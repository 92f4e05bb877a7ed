"""``python -m pipeline.tracking sync <run_dir> [--uri URI]``: sends what the run's journal holds and its MLflow run
lacks (`pipeline.tracking.sync`) and prints the counts as JSON; exits 1 if MLflow refused a record."""

import argparse
import json
import logging

from pipeline.tracking.sync import sync_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    parser.add_argument("command", choices=["sync"], help="send the journaled records the MLflow run lacks")
    parser.add_argument("run_dir")
    parser.add_argument("--uri", help="tracking URI (default: the one recorded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = sync_run(args.run_dir, uri=args.uri)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 1 if report["refused"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
