"""The watcher canary: the only proof that events still arrive (FIELD-NOTES §1).

``observer.is_alive()`` stays True when the inotify reader dies or the root is deleted and recreated, so
the daemon writes a small dot-file into the watched root every ``interval_s`` and expects its event back
within a grace period. A canary that does not come back means the watcher is deaf.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("sidecar.health")

CANARY_NAME = b".sidecar-canary"
OK, WAITING, DEAF = "ok", "waiting", "deaf"


class Canary:
    """Writes the canary file and judges whether its event came back."""

    def __init__(self, root: Path, *, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = os.path.join(os.fsencode(root), CANARY_NAME)
        self._root = root
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self.written_at = 0.0
        self.seen_at = 0.0
        self.verdict = WAITING

    @staticmethod
    def matches(rel: bytes) -> bool:
        return rel == CANARY_NAME

    def seen(self) -> None:
        with self._lock:
            self.seen_at = self._clock()

    def write(self) -> None:
        """(Re)write the canary; creates the root if it was deleted."""
        self._root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.written_at = self._clock()
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, str(time.time()).encode())
        finally:
            os.close(fd)

    def check(self, observer_alive: bool, *, grace_s: float) -> str:
        """ok, waiting (written, not yet due) or deaf; writes the next canary when one is due."""
        now = self._clock()
        with self._lock:
            proven = self.seen_at >= self.written_at > 0
            overdue = now - self.written_at > grace_s
            due = now - self.written_at >= self.interval_s
        if not observer_alive:
            verdict = DEAF
        elif proven:
            verdict = OK
        else:
            verdict = DEAF if overdue else WAITING
        if verdict == DEAF or (proven and due):
            try:
                self.write()
            except OSError as exc:
                log.warning("canary_write_failed", error=exc.strerror)
        if verdict != WAITING:
            self.verdict = verdict
        return verdict

    @property
    def healthy(self) -> bool:
        return self.verdict != DEAF
