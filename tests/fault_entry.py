"""Test-only entry point: `python -m tests.fault_entry <pipeline.train arguments>`.

Runs pipeline.train.main with a pause injected at a chosen point, so a test can SIGKILL the process
exactly there (production code has no such hook):
- FAULT_PAUSE_AT_STEP=k: in the middle of the step after step k (after its forward, before backward);
- FAULT_PAUSE_IN_SAVE_AT_STEP=s: inside engine.save_checkpoint of step s, right after DeepSpeed wrote
  its first file (so the tag directory is half written and has no COMPLETE marker).
On pausing it writes its pid to FAULT_FLAG and sleeps until killed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline import checkpoint, step, train


def _pause() -> None:
    Path(os.environ["FAULT_FLAG"]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def install() -> None:
    pause_step = os.environ.get("FAULT_PAUSE_AT_STEP")
    if pause_step is not None:
        check_finite = step.check_finite

        def check_then_pause(loss, info, progress, max_in_a_row):
            if progress.step == int(pause_step):
                _pause()
            return check_finite(loss, info, progress, max_in_a_row)

        step.check_finite = check_then_pause

    save_step = os.environ.get("FAULT_PAUSE_IN_SAVE_AT_STEP")
    if save_step is not None:
        save = checkpoint.save

        def save_with_pause(engine, ckpt_dir, step, *args, **kwargs):
            if step == int(save_step):
                write = engine.checkpoint_engine.save

                def write_then_pause(state_dict, path):
                    write(state_dict, path)
                    _pause()

                engine.checkpoint_engine.save = write_then_pause
            return save(engine, ckpt_dir, step, *args, **kwargs)

        checkpoint.save = save_with_pause


if __name__ == "__main__":
    install()
    sys.exit(train.main())
