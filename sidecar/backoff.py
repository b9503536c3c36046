"""Backoff for the journal retry layer, and the circuit breaker that pauses claiming during an outage.

One small function (exponential, jitter, cap) serves both: a file's next attempt after a transient error,
and how long the breaker waits before it lets the next probe through.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass


def backoff(attempt: int, *, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter-ish exponential backoff: between half and all of ``min(cap, base * 2**(attempt-1))``."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return float(ceiling * (0.5 + 0.5 * rand()))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long the journal layer waits between attempts, and when it gives up."""

    max_attempts: int
    base_s: float
    cap_s: float


class Breaker:
    """Stops claiming work while the store is down; lets one probe through per backoff step."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float]) -> None:
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0
        self._until = 0.0

    def allowance(self, free: int) -> int:
        """How many files may be claimed now, given ``free`` idle workers."""
        with self._lock:
            if self.failures == 0:
                return free
            if self._clock() < self._until:
                return 0
            self._until = self._clock() + backoff(self.failures, base=self._policy.base_s, cap=self._policy.cap_s)
            return min(free, 1)

    def wait_s(self) -> float:
        with self._lock:
            return max(0.0, self._until - self._clock()) if self.failures else 0.0

    def record(self, *, reachable: bool) -> bool:
        """Note whether the store answered; True when this ends an outage."""
        with self._lock:
            if reachable:
                recovered, self.failures = self.failures > 0, 0
                return recovered
            self.failures += 1
            if self.failures == 1:
                self._until = self._clock() + backoff(1, base=self._policy.base_s, cap=self._policy.cap_s)
            return False
