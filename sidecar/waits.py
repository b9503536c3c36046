"""Long polls: a request that waits for a condition (a job stored, the queue empty) without spinning.

Each wait holds one of the HTTP server's worker threads, so their number is capped below the pool's size
(``/healthz`` and ``/metrics`` always find a free thread); a request over the cap is told to retry
(``429``). A waiter re-checks its condition whenever something changed (:meth:`Waits.changed`: an upload
ended, a job moved on) and at least once a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MAX_WAIT_S = 300.0
MAX_WAITERS = 8  # the HTTP server has four threads more (sidecar.http)
RECHECK_S = 1.0


class TooManyWaiters(Exception):
    pass


class Waits:
    def __init__(self, max_waiters: int) -> None:
        self.max_waiters = max_waiters
        self._cond = threading.Condition()
        self._waiting = 0
        self._generation = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def changed(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, probe: Callable[[], tuple[bool, T]], timeout_s: float) -> T:
        """``probe()`` → (done, answer); returns the answer once done or when ``timeout_s`` ran out."""
        seen = self._generation  # taken before the probe: a change during it is not slept through
        done, answer = probe()
        if done or timeout_s <= 0:
            return answer
        with self._cond:
            if self._waiting >= self.max_waiters:
                raise TooManyWaiters
            self._waiting += 1
        try:
            deadline = time.monotonic() + min(timeout_s, MAX_WAIT_S)
            while (left := deadline - time.monotonic()) > 0:
                with self._cond:
                    if self._generation == seen:
                        self._cond.wait(timeout=min(left, RECHECK_S))
                    seen = self._generation
                done, answer = probe()
                if done:
                    return answer
            return answer
        finally:
            with self._cond:
                self._waiting -= 1
