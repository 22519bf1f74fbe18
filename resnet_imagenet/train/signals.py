"""Caffe's SignalHandler for training: SIGINT / SIGHUP set a pending action that the loop reads once per iteration.

The defaults are Caffe's ``-sigint_effect stop`` and ``-sighup_effect snapshot``.
"""

from __future__ import annotations

import signal

NONE, SNAPSHOT, STOP = 0, 1, 2
EFFECTS = {"stop": STOP, "snapshot": SNAPSHOT, "none": NONE}  # --sigint-effect / --sighup-effect values


class Signals:
    """Caffe's SignalHandler: signals set a pending action, read once per iteration."""

    def __init__(self, sigint: str, sighup: str):
        for v in (sigint, sighup):
            if v not in EFFECTS:
                raise ValueError(f"signal effect {v!r}: one of {', '.join(EFFECTS)}")
        self.effects = {signal.SIGINT: EFFECTS[sigint], signal.SIGHUP: EFFECTS[sighup]}
        self.pending = NONE
        self._old: dict = {}

    def __enter__(self) -> Signals:
        for sig in self.effects:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pending = max(self.pending, self.effects[signum])

    def take(self) -> int:
        """The pending action (NONE, SNAPSHOT or STOP), which is then cleared."""
        action, self.pending = self.pending, NONE
        return action

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
