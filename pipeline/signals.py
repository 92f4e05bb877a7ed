"""Signals that ask a run to stop: it checkpoints at the end of the current step, then exits.

SIGTERM (Slurm's preemption and time limit, scancel), SIGUSR1 (Slurm's --signal warning before the
time limit) and a first Ctrl-C (SIGINT) set the flag; a second Ctrl-C interrupts at once
(KeyboardInterrupt: no checkpoint of this step, the newest complete one stays the resume point).
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class StopFlag:
    """The entry point creates it first thing: a signal that comes while the run starts up (imports,
    rendezvous, loading a checkpoint) is remembered, not lost, and not fatal (USR1 would kill by default)."""

    def __init__(self) -> None:
        self.requested = False
        self.install()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        log.warning("received %s: checkpointing and stopping after this step%s", signal.Signals(signum).name,
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.requested = True
