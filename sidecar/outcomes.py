"""How an upload attempt ended, written down: the journal's state, the metrics and one log line. Never
imports watchdog or boto3.

Every attempt ends in exactly one journal outcome, whatever it raised:

- uploaded / existing / unchanged: the bytes are in the bucket (proven by the store's ETag);
- pause: the store is down or unusable (:mod:`sidecar.store_health`); back to pending, not counted, and
  nothing is claimed until the store answers well again;
- retry: a transient error of this file (throttling, a bad digest, EIO, a file still changing, a bug);
  back to pending, due after exponential backoff with jitter, counted; after ``max_attempts``, parked;
- failed: a permanent error of this file (an object-scope 403, a key that cannot exist), parked with its
  error class and message for ``sidecar retry-failed``;
- skipped: the file is gone or not a regular file; a later change re-queues it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from sidecar.backoff import RetryPolicy, backoff
from sidecar.errors import SourceFileError, StoreError
from sidecar.journal import FileRow, Journal
from sidecar.keys import path_text
from sidecar.metrics import Metrics
from sidecar.store_health import PARK, PAUSE, StoreHealth
from sidecar.transfer import Result

log = structlog.get_logger("sidecar.uploader")  # the upload_* events keep the uploader's logger name


class Outcomes:
    """Records each attempt's outcome; every method returns the outcome's label (counted in the metrics)."""

    def __init__(self, journal: Journal, *, policy: RetryPolicy, metrics: Metrics, health: StoreHealth,
                 clock: Callable[[], float] = time.time) -> None:
        self._journal = journal
        self._policy = policy
        self._metrics = metrics
        self.health = health
        self._clock = clock
        self.last_key = ""
        # Set by the composition root: a file was held for its prompt, an object was written.
        self.on_held: Callable[[], None] = lambda: None
        self.on_stored: Callable[[FileRow, Result], None] = lambda row, result: None

    def count(self, outcome: str) -> str:
        self._metrics.uploads.labels(outcome=outcome).inc()
        return outcome

    def succeeded(self, row: FileRow, result: Result, *, then_claim: int) -> list[FileRow]:
        """Write the success down; with ``then_claim``, claim (and return) the worker's next rows in that write.
        :meth:`report_success` follows."""
        return self._journal.mark_uploaded(row, uploaded=result.version, md5=result.md5, key=result.key,
                                           etag=result.etag, then_claim=then_claim)

    def report_success(self, row: FileRow, result: Result, duration: float) -> None:
        """The success's metrics, log line and hook (a webhook's outbox row)."""
        if result.outcome == "unchanged":
            log.info("upload_unchanged", path=path_text(row.path), key=result.key)
            return
        now = self._clock()
        self.last_key = result.key
        self._metrics.last_success.set(now)
        self._metrics.e2e_latency.observe(max(0.0, now - result.mtime_ns / 1e9))
        if result.outcome == "uploaded":
            self._metrics.bytes_uploaded.inc(result.size)
            self._metrics.upload_duration.observe(duration)
        if result.variant_of:
            log.warning("key_taken_stored_as_variant", path=path_text(row.path), key=result.key,
                        taken_key=result.variant_of)
        log.info("upload_succeeded", path=path_text(row.path), key=result.key, bytes=result.size,
                 attempt=row.attempts + 1, duration_s=round(duration, 4), outcome=result.outcome,
                 source=row.source)
        self.on_stored(row, result)

    def source_problem(self, row: FileRow, exc: SourceFileError) -> str:
        rel = path_text(row.path)
        if exc.reason == "unreadable":
            error_class = f"unreadable/{exc.detail}" if exc.detail else "unreadable"
            if exc.transient:
                return self.retry_later(row, str(exc), error_class)
            self._journal.mark_failed(row, error=str(exc), error_class="unreadable")
            log.error("upload_failed", path=rel, attempt=row.attempts + 1, error=str(exc), error_class="unreadable")
            return self.count("failed")
        self._journal.mark_skipped(row, reason=exc.reason)
        self._metrics.files_skipped.labels(reason=exc.reason).inc()
        (log.warning if exc.reason == "vanished" else log.info)("upload_skipped", path=rel, reason=exc.reason)
        return self.count("skipped")

    def store_problem(self, row: FileRow, exc: StoreError) -> str:
        verdict = self.health.judge(exc)
        if verdict == PAUSE:  # the store's fault, not the file's: no attempt counted, due once it is healthy
            self._journal.mark_retry(row, error=str(exc), error_class=exc.error_class, delay_s=0, count=False)
            self._metrics.retries.labels(error_class=exc.error_class).inc()
            log.info("upload_retry_scheduled", path=path_text(row.path), key=exc.key, attempt=row.attempts,
                     error=str(exc), error_class=exc.error_class, delay_s=0, layer="pause")
            return self.count("paused")
        if verdict == PARK:
            return self._park(row, exc)
        return self.retry_later(row, str(exc), exc.error_class, key=exc.key, hint=exc.hint)

    def retry_later(self, row: FileRow, error: str, error_class: str, *, base: float | None = None,
                     key: str = "", hint: str = "") -> str:
        """A counted retry with backoff; parked once the attempts run out."""
        attempt = row.attempts + 1
        if attempt >= self._policy.max_attempts:
            self._journal.mark_failed(row, error=error, error_class=error_class)
            log.error("upload_failed", path=path_text(row.path), key=key, attempt=attempt, error=error,
                      error_class=error_class, hint=hint, reason="attempts_exhausted")
            return self.count("failed")
        delay = backoff(attempt, base=base or self._policy.base_s, cap=self._policy.cap_s)
        self._journal.mark_retry(row, error=error, error_class=error_class, delay_s=delay)
        self._metrics.retries.labels(error_class=error_class.split("/", maxsplit=1)[0]).inc()
        log.warning("upload_retry_scheduled", path=path_text(row.path), key=key, attempt=attempt, error=error,
                    error_class=error_class, delay_s=round(delay, 3), layer="journal")
        return self.count("retry")

    def _park(self, row: FileRow, exc: StoreError) -> str:
        self._journal.mark_failed(row, error=str(exc), error_class=exc.error_class)
        log.error("upload_failed", path=path_text(row.path), key=exc.key, attempt=row.attempts + 1, error=str(exc),
                  error_class=exc.error_class, hint=exc.hint)
        return self.count("failed")
