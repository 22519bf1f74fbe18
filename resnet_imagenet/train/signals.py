"""Caffe's SignalHandler for training: SIGINT / SIGHUP / SIGTERM set a pending action that the loop reads once
per iteration; under torchrun the death of the launcher is a STOP too.

The defaults are Caffe's ``-sigint_effect stop`` and ``-sighup_effect snapshot``; SIGTERM (a scheduler's
preemption or time limit, ``kill PID``, torchrun passing on a second Ctrl-C) defaults to stop as well: the
iteration in progress ends, the stop snapshot is written, the process exits 0 -- within a second or two of
a small net's iteration plus one snapshot write, inside the usual 30 s grace of Slurm (KillWait) and
Kubernetes (terminationGracePeriodSeconds) before their SIGKILL. ``none`` ignores the signal (Caffe's none).

A trainer started by torchrun (TORCHELASTIC_RUN_ID set) remembers its parent, the launcher; when the
launcher dies (kill -9: it can neither forward signals nor kill its workers) the trainer's parent changes,
which the loop notices at its next iteration: it snapshots and stops instead of training unsupervised.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

NONE, SNAPSHOT, STOP = 0, 1, 2
EFFECTS = {"stop": STOP, "snapshot": SNAPSHOT, "none": NONE}  # --sigint-effect / --sighup-effect / --sigterm-effect


def launcher_pid() -> int | None:
    """The pid of torchrun's agent when it launched this process (our parent then), else None."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


class Signals:
    """Caffe's SignalHandler: signals set a pending action, read once per iteration."""

    def __init__(self, sigint: str, sighup: str, sigterm: str = "stop", parent: int | None = None):
        """``parent``: a pid whose death (our parent pid changes) is a STOP (see launcher_pid)."""
        for v in (sigint, sighup, sigterm):
            if v not in EFFECTS:
                raise ValueError(f"signal effect {v!r}: one of {', '.join(EFFECTS)}")
        self.effects = {
            signal.SIGINT: EFFECTS[sigint],
            signal.SIGHUP: EFFECTS[sighup],
            signal.SIGTERM: EFFECTS[sigterm],
        }
        self.parent = parent
        self.pending = NONE
        self._old: dict = {}

    def __enter__(self) -> Signals:
        for sig in self.effects:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pending = max(self.pending, self.effects[signum])

    def peek(self) -> int:
        """The pending action, counting a dead launcher as STOP (reported once)."""
        if self.parent is not None and os.getppid() != self.parent:
            log.warning("the launcher (pid %d) is gone: stopping", self.parent)
            self.parent = None
            self.pending = STOP
        return self.pending

    def take(self) -> int:
        """The pending action (NONE, SNAPSHOT or STOP), which is then cleared."""
        action, self.pending = self.peek(), NONE
        return action

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
