"""Progress of the multipart upload on each worker thread: a gauge, and a log line at a bounded rate."""

from __future__ import annotations

import threading
import time

import structlog

from sidecar.metrics import Metrics

log = structlog.get_logger("sidecar.uploader")

PROGRESS_EVERY_S = 5.0


class Progress:
    """``update(done, total)`` from the thread that uploads; ``end()`` when its upload ends, however."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._local = threading.local()

    def update(self, done: int, total: int) -> None:
        state = self._local.__dict__
        now = time.monotonic()
        if done <= 0 or state.get("total") != total or done < state.get("done", 0):
            self.end()
            state.update(total=total, done=0, started=now, logged=now)
        self._metrics.upload_progress.inc(done - state["done"])
        state["done"] = done
        if now - state["logged"] >= PROGRESS_EVERY_S or done >= total:
            rate = done / max(1e-6, now - state["started"])
            log.info("upload_progress", bytes_done=done, bytes_total=total, rate_bps=int(rate))
            state["logged"] = now
        if done >= total:
            self.end()

    def end(self) -> None:
        """Take this thread's upload out of the in-progress gauge (finished, failed or cut short)."""
        state = self._local.__dict__
        if state.get("done"):
            self._metrics.upload_progress.dec(state["done"])
        state.clear()
