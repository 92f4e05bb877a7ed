"""``python -m data_prep``: runs the CLI (data_prep/cli.py) and exits with its status."""

import os
import sys


def _exit_now(code: int) -> None:
    """Exit with ``code`` as is. ``sys.exit`` is not enough after Ctrl-C: CPython 3.11 turns the
    exit into a death by SIGINT (status -2, not 130) when the KeyboardInterrupt passed through an
    ``exec`` (dataclasses run one per class, so any import can be where it lands), even though the
    CLI handled it. Everything the build wrote is already removed; only the streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # spawned tokenizer workers import this module too
    try:
        from .cli import EXIT_INTERRUPTED, main
    except KeyboardInterrupt:  # Ctrl-C while starting up: nothing was done yet
        print("error: interrupted by Ctrl-C (python -m data_prep): run the same command again", file=sys.stderr)
        _exit_now(130)
    code = main()
    if code == EXIT_INTERRUPTED:
        _exit_now(code)
    sys.exit(code)
