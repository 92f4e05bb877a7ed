"""The command line of `python -m pipeline.train`: arguments, logging, exit codes.

Exit codes: 0 done (or stopped by a signal after its checkpoint), 2 bad input (config, data, output
dir: one `error:` line, no traceback), 1 a bug. Heavy libraries are imported only after the
arguments parsed, so `--help` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline.signals import StopFlag

log = logging.getLogger("pipeline.train")


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set train.lr=5e-4 --set select.policy=sift")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(train: Callable, argv: list[str] | None = None) -> int:
    stop = StopFlag()  # first: a preemption signal during start-up is remembered
    args = parse_args(argv, sys.modules[train.__module__].__doc__)
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)  # every config error surfaces before any compute
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    from pipeline import distributed
    from pipeline.manifest import DataError

    try:
        info = distributed.init_distributed(cfg.train.device)
    except distributed.DeviceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(info.rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        train(cfg, info, stop)
    except (ConfigError, DataError) as err:  # bad input, found before any training step
        log.error("%s", err)
        distributed.shutdown(barrier=False)
        return 2
    # No barrier after a failure (an exception propagates from here): the other ranks may be
    # healthy and inside a collective, and a barrier would hang this rank without its traceback.
    distributed.shutdown()
    return 0
