"""SIGINT / SIGTERM as an exception, so that ``finally`` blocks (temporary files, worker processes) run.

Python turns SIGINT into KeyboardInterrupt but leaves SIGTERM (a scheduler's time limit, ``kill PID``)
to its default action, which ends the process without running any cleanup. Inside ``interruptible()``
either signal raises Interrupted once; a repeated signal during the cleanup that follows is ignored, so
the cleanup finishes. The cli prints one line and exits 128 + the signal number (130, 143).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived; ``code`` is the shell's exit status for it (128 + signum)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.code = 128 + signum

    def with_message(self, message: str) -> Interrupted:
        """The same interruption with ``message`` (what was left behind) in place of the default."""
        return Interrupted(self.signum, f"interrupted by {signal.Signals(self.signum).name}: {message}")


@contextlib.contextmanager
def interruptible(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Raise Interrupted on the first of ``signals`` (main thread only; elsewhere a no-op), ignore repeats."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handle(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    old = {s: signal.signal(s, handle) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
