"""The command line of `python -m pipeline.train`: arguments, logging, exit codes.

Exit codes (README, "Exit codes"):
  0    the run finished, or stopped on SIGTERM / SIGUSR1 / Ctrl-C after checkpointing this step
       (its MLflow run says KILLED; the same command resumes it)
  2    bad input: config, data, output directory, devices; one `error: <what> (<where>): <what to do>`
       line on stderr, no traceback, nothing trained
  3    stopped by a guard (non-finite losses or weights); the newest complete checkpoint is intact
  130  interrupted at once (a second Ctrl-C); the newest complete checkpoint is intact
  1    a bug: the traceback says where
Heavy libraries are imported only after the arguments parsed, so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline.signals import StopFlag

log = logging.getLogger("pipeline.train")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as the one `error:` line of every other bad input (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (command line): see `{self.prog} --help`\n")


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m pipeline.train", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set train.lr=5e-4 --set select.policy=sift")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest complete checkpoint (same as --set "
                             "train.out_dir=RUN_DIR, but an error when there is nothing to resume)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, each key with its meaning, and exit (docs/CONFIG.md)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resume_overrides(run_dir: str | None) -> list[str]:
    """--resume RUN_DIR: the run directory, which must hold a checkpoint to resume."""
    if run_dir is None:
        return []
    from pathlib import Path

    from pipeline.checkpoint import complete_tags
    from pipeline.errors import ConfigError

    if not complete_tags(Path(run_dir) / "checkpoints"):
        raise ConfigError(f"nothing to resume: {run_dir} holds no complete checkpoint", "--resume",
                          "pass the directory of a run that saved a checkpoint (train.out_dir), or start a new run")
    return [f"train.out_dir={run_dir}", "train.resume=true"]


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def error_line(err: BaseException) -> str:
    """One line: an error re-raised from a DataLoader worker carries the worker's traceback text,
    whose last line is the original `module.Class: message`."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    head, sep, rest = text.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == type(err).__name__ else text


def run_cli(train: Callable, argv: list[str] | None = None) -> int:
    stop = StopFlag()  # first: a preemption signal during start-up is remembered
    args = parse_args(argv, sys.modules[train.__module__].__doc__)
    from pipeline.errors import EXIT_BAD_INPUT, EXIT_GUARD, InputError, NonFiniteStop

    distributed = None
    try:
        from pipeline.config import load_config

        cfg = load_config(args.config, args.set + resume_overrides(args.resume))  # every config error, before compute
        if args.print_config:
            from pipeline.config_help import describe

            try:
                print(describe(cfg), flush=True)
            except BrokenPipeError:  # `--print-config | head`
                sys.stdout = open(os.devnull, "w")
            return 0
        import torch

        from pipeline import distributed

        info = distributed.init_distributed(cfg.train.device)
        setup_logging(info.rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        train(cfg, info, stop)
    except InputError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except NonFiniteStop as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        code = EXIT_GUARD
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C twice) before this step's checkpoint (SIGINT): the newest complete "
              "checkpoint is intact; the same command resumes from it", file=sys.stderr)
        code = 130
    else:
        distributed.shutdown()
        return 0
    # No barrier after a failure: the other ranks may be healthy and inside a collective, and a
    # barrier would hang this rank. (Other exceptions propagate with their traceback: exit 1.)
    if distributed is not None:
        distributed.shutdown(barrier=False)
    return code
