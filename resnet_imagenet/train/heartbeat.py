"""Peer heartbeats: a frozen process (a hung node, ``kill -STOP``) is named and the run stopped in minutes.

A collective only times out after the process-group timeout, which must outlast rank 0's TEST pass
while the other ranks wait (RESNET_IMAGENET_PG_TIMEOUT, default 30 min), and it does not say who is
missing. So every process also runs a thread that bumps its counter in the rendezvous store (torchrun's
TCPStore at MASTER_ADDR:MASTER_PORT, served by the launcher, so it answers even when a rank freezes)
every PEER_TIMEOUT / 10 and watches the others' counters. A counter that has not moved for
RESNET_IMAGENET_PEER_TIMEOUT seconds (default 120) means that process is frozen or unreachable (the
thread beats through long TEST passes and snapshots, so a busy rank is never taken for a frozen one):
the watching processes print one line naming it and exit 1; torchrun then ends the frozen one (SIGKILL
after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 60 s under train.sh). Every rank's clock is its own: no skew.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

PEER_TIMEOUT_ENV, PEER_TIMEOUT_S = "RESNET_IMAGENET_PEER_TIMEOUT", 120.0
LEFT = 1 << 40  # added to a counter by a process that leaves on purpose


def peer_timeout() -> float:
    """RESNET_IMAGENET_PEER_TIMEOUT in seconds (0: no heartbeats)."""
    return float(os.environ.get(PEER_TIMEOUT_ENV, PEER_TIMEOUT_S))


class Heartbeat:
    """The beating and watching thread of one rank (start() / stop())."""

    def __init__(self, rank: int, world: int, timeout: float, store: dist.Store):
        self.rank, self.world, self.timeout, self.store = rank, world, timeout, store
        self.interval = max(0.1, timeout / 10)
        self.prefix = f"resnet_imagenet/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @classmethod
    def connect(cls, rank: int, world: int) -> Heartbeat | None:
        """A Heartbeat on its own connection to the rendezvous store; None without one or with timeout 0."""
        timeout = peer_timeout()
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not timeout or not host or not port:
            return None
        t = datetime.timedelta(seconds=max(timeout, 10))
        store = dist.TCPStore(host, int(port), world_size=None, is_master=False, timeout=t, wait_for_workers=False)
        return cls(rank, world, timeout, store)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and tell the others this rank left on purpose (not frozen)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.add(f"{self.prefix}/{self.rank}", LEFT)
        except Exception:  # the store is gone with the launcher: nobody is left to tell
            pass

    def _run(self) -> None:
        seen = {r: (-1, time.monotonic()) for r in range(self.world) if r != self.rank}
        store_ok = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self.store.add(f"{self.prefix}/{self.rank}", 1)
                counts = {r: self.store.add(f"{self.prefix}/{r}", 0) for r in seen}
                store_ok = now
            except Exception as e:  # the store (the launcher, or rank 0 without torchrun) stopped answering
                if now - store_ok > self.timeout:
                    self._fail(f"the rendezvous store stopped answering ({str(e).splitlines()[0]})")
                continue
            for r, n in counts.items():
                if n >= LEFT:
                    seen.pop(r)
                elif n != seen[r][0]:
                    seen[r] = (n, now)
            frozen = sorted(r for r, (_, t) in seen.items() if now - t > self.timeout)
            if frozen and not self._stop.is_set():
                ranks = ", ".join(map(str, frozen))
                self._fail(f"rank {ranks} stopped answering: no heartbeat for {now - seen[frozen[0]][1]:.0f} s")

    def _fail(self, why: str) -> None:
        sys.stderr.write(
            f"resnet-imagenet train: error: {why} ({PEER_TIMEOUT_ENV}={self.timeout:g} s); rank {self.rank} stopping\n"
        )
        sys.stderr.flush()
        os._exit(1)  # the main thread may be blocked in a collective that only the process-group timeout ends
