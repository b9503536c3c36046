"""Backoff for the journal retry layer: a file's next attempt after an error of its own.

Outages are not backed off per file: while the store is down nothing is claimed at all
(:mod:`sidecar.store_health`).
"""

from __future__ import annotations

import random
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
