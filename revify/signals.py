"""SIGINT, SIGTERM and SIGHUP end a command with one line and the shell's exit code, temporaries removed.

Python turns SIGINT into ``KeyboardInterrupt`` (a traceback where nothing
catches it) and dies silently on SIGTERM and SIGHUP, skipping every
``finally``: a convert killed while writing left its temporary folder. Here
each of the three raises ``Interrupted`` where the process is, so the
``finally`` blocks of the atomic writer remove what it made, and the command
line prints one line and exits 128 + the signal number (130, 143, 129). A
second signal while cleaning up is ignored, so the cleanup finishes.

Before::

    $ revify convert ./bert --out ./x & kill -HUP $!      # exit 129, .x.revify-tmp-… left behind

After::

    revify: error: terminated by SIGHUP; nothing written    (exit 129, no temporary folder)
"""
from __future__ import annotations

import signal
from typing import Callable

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A handled signal arrived; not an ``Exception``, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


def _raise(signum: int, frame: object) -> None:
    for s in HANDLED:  # the cleanup that follows must not be interrupted again
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def run_interruptible(command: Callable[[], int], report: Callable[[str], None]) -> int:
    """``command()`` with the three signals raising ``Interrupted``; its exit code, or 128 + the signal."""
    previous = {}
    try:
        for s in HANDLED:
            previous[s] = signal.signal(s, _raise)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        return command()
    except Interrupted as exc:
        report(f"{'interrupted' if exc.signum == signal.SIGINT else 'terminated'} by {exc.name}; nothing written")
        return exc.exit_code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = ["Interrupted", "run_interruptible", "HANDLED"]
