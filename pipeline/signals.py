"""SIGTERM / SIGUSR1 (Slurm preemption and time limits) ask the loop to checkpoint and exit."""
from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checkpoints and exits at the end of the current step.

    The entry point creates it first thing: a signal that comes while the run starts up (imports,
    rendezvous, loading a checkpoint) is remembered, not lost, and not fatal (USR1 would kill by default)."""

    def __init__(self) -> None:
        self.requested = False
        self.install()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum: int, _frame) -> None:
        log.warning("received signal %d: checkpointing and stopping after this step", signum)
        self.requested = True
