"""The uploader: a pool of workers draining the journal into the object store. Never imports watchdog.

Two retry layers. In process, tenacity retries a transient store error a few times within seconds (blips).
Beyond that the file goes back to the journal as pending with ``next_attempt_at`` pushed out by
exponential backoff with jitter and a cap, so an outage of hours costs no CPU and survives restarts. A
circuit breaker stops claiming files while the store is unreachable and sends one probe at a time.
A file that runs out of attempts, or hits a permanent error, is parked as ``failed`` — never dropped.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_random_exponential,
)

from sidecar.backoff import Breaker, RetryPolicy, backoff
from sidecar.errors import JournalError, SourceFileError, StoreError, TransientStoreError
from sidecar.journal import FileRow, Journal
from sidecar.keys import path_text
from sidecar.logs import RateLimitedLog
from sidecar.metrics import Metrics
from sidecar.transfer import FileChanged, Result, Retry, Transfer

log = structlog.get_logger("sidecar.uploader")
T = TypeVar("T")

FAST_ATTEMPTS = 3
FIRST_RETRY_MAX_S = 0.2
PROGRESS_EVERY_S = 5.0
JOURNAL_RETRY_S = 1.0
OUTAGE_LOG_EVERY_S = 60.0
OUTAGE_CODES = frozenset({"ConnectionError", "Timeout", "InternalError", "ServiceUnavailable"})


def _is_outage(exc: StoreError) -> bool:
    # A 5xx with an S3 error document carries its code (InternalError, ServiceUnavailable), not the status.
    return exc.code in OUTAGE_CODES or exc.code.startswith("5")


class Uploader:
    """Claims due journal rows and uploads them on ``workers`` threads."""

    def __init__(
        self,
        journal: Journal,
        transfer_factory: Callable[[Retry, Callable[[int, int], None]], Transfer],
        *,
        workers: int,
        policy: RetryPolicy,
        metrics: Metrics,
        settle_s: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._journal = journal
        self._policy = policy
        self._metrics = metrics
        self._settle_s = settle_s
        self._clock = clock
        self._workers = workers
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._queue: queue.Queue[FileRow | None] = queue.Queue()
        self._lock = threading.Lock()
        self._inflight = 0
        self._stranded: set[int] = set()  # claimed rows whose outcome the journal refused
        self._idle = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self.breaker = Breaker(policy, time.monotonic)
        # One streak for the whole store: during an outage every file fails the same way. Per-attempt
        # upload_retry_scheduled lines stay; this error summary is logged at most once a minute.
        self._outage_log = RateLimitedLog(log, interval_s=OUTAGE_LOG_EVERY_S)
        self.last_key = ""
        self._progress = threading.local()
        # Built once: tenacity keeps per-call state thread-local, and a Retrying per request costs CPU.
        self._fast_retry = self._retrying(FAST_ATTEMPTS - 1)
        self._transfer = transfer_factory(self.retry, self._on_progress)

    # -- the in-process retry layer --------------------------------------------------------------------

    def _retrying(self, attempts: int) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(attempts) | stop_when_event_set(self._stopping),
            wait=wait_random_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception_type(TransientStoreError),
            before_sleep=self._log_fast_retry,
            sleep=self._sleep,
            reraise=True,
        )

    def retry(self, fn: Callable[[], T]) -> T:
        """Run one store call, retrying transient errors a few times within seconds (once while the store is
        known to be down: the journal's backoff covers outages)."""
        if self.breaker.failures:
            return fn()
        try:
            return fn()  # the common case, without tenacity's machinery (3.8% of burst CPU in the profile)
        except TransientStoreError as exc:
            if self._stopping.is_set():
                raise
            delay = random.uniform(0, FIRST_RETRY_MAX_S)
            self._note_fast_retry(exc, attempt=1, delay=delay)
            self._sleep(delay)
        return self._fast_retry(fn)  # the remaining FAST_ATTEMPTS - 1 attempts

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)  # a shutdown cuts the wait short

    def _log_fast_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, StoreError):  # attempt 1 was made outside tenacity, by retry()
            self._note_fast_retry(exc, attempt=state.attempt_number + 1, delay=state.upcoming_sleep)

    def _note_fast_retry(self, exc: StoreError, *, attempt: int, delay: float) -> None:
        self._metrics.retries.labels(error_class=exc.error_class).inc()
        log.info("upload_retry_scheduled", key=exc.key, attempt=attempt, error=str(exc),
                 error_class=exc.error_class, delay_s=round(delay, 3), layer="fast")

    # -- dispatch -----------------------------------------------------------------------------------

    def wake(self) -> None:
        """New work may be due: claim now instead of at the next tick."""
        self._wake.set()

    def run_once(self) -> int:
        """Claim as many due rows as there are idle workers (and the breaker allows); queue them."""
        if self._stopping.is_set():
            return 0
        self._release_stranded()
        with self._lock:
            free = self._workers - self._inflight
        allowed = self.breaker.allowance(free)
        if allowed <= 0:
            return 0
        rows = self._journal.claim(allowed)
        with self._lock:
            self._inflight += len(rows)
        for row in rows:
            self._queue.put(row)
        return len(rows)

    def _release_stranded(self) -> None:
        """Rows whose outcome could not be written (journal full) go back to pending once it takes writes again.

        Left alone they would stay ``uploading`` until the next start. Uploading them again is safe: a key we
        already wrote answers 412 and a HEAD shows our MD5.
        """
        with self._lock:
            stranded = sorted(self._stranded)
        for row_id in stranded:
            self._journal.mark_retry(row_id, error="the journal refused the outcome of the last attempt",
                                     error_class="JournalError", delay_s=0, count=False)
            with self._lock:
                self._stranded.discard(row_id)

    def process(self, row: FileRow) -> str:
        """Upload one claimed row and record the outcome in the journal; returns the outcome label."""
        started = time.monotonic()
        try:
            result = self._transfer.run(row)
        except FileChanged:
            self._journal.mark_retry(row.id, error="file changed while reading", error_class="FileChanged",
                                     delay_s=self._settle_s, count=False)
            return self._count("changed")
        except SourceFileError as exc:
            return self._source_problem(row, exc)
        except StoreError as exc:
            return self._store_problem(row, exc)
        finally:
            self._end_progress()
        self._succeeded(row, result, time.monotonic() - started)
        return self._count(result.outcome)

    def _count(self, outcome: str) -> str:
        self._metrics.uploads.labels(outcome=outcome).inc()
        return outcome

    def _succeeded(self, row: FileRow, result: Result, duration: float) -> None:
        self._journal.mark_uploaded(row.id, size=result.size, mtime_ns=result.mtime_ns, md5=result.md5,
                                    key=result.key, etag=result.etag, claimed=(row.size, row.mtime_ns))
        self.breaker.record(reachable=True)
        self._outage_log.recovered("store_recovered", key=result.key)  # once, only after an outage
        self._metrics.store_reachable.set(1)
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

    def _source_problem(self, row: FileRow, exc: SourceFileError) -> str:
        rel = path_text(row.path)
        if exc.reason == "unreadable":
            self._journal.mark_failed(row.id, error=str(exc), error_class="unreadable")
            log.error("upload_failed", path=rel, attempt=row.attempts + 1, error=str(exc), error_class="unreadable")
            return self._count("failed")
        self._journal.mark_skipped(row.id, reason=exc.reason)
        self._metrics.files_skipped.labels(reason=exc.reason).inc()
        log.info("upload_skipped", path=rel, reason=exc.reason)
        return self._count("skipped")

    def _store_problem(self, row: FileRow, exc: StoreError) -> str:
        rel = path_text(row.path)
        attempt = row.attempts + 1
        if exc.transient:
            outage = _is_outage(exc)
            self.breaker.record(reachable=not outage)
            self._metrics.store_reachable.set(0 if outage else 1)
            if outage:
                self._outage_log.error("store_unavailable", operation=exc.operation, error=str(exc),
                                       error_class=exc.error_class)
        if exc.transient and attempt < self._policy.max_attempts:
            delay = backoff(attempt, base=self._policy.base_s, cap=self._policy.cap_s)
            self._journal.mark_retry(row.id, error=str(exc), error_class=exc.error_class, delay_s=delay)
            self._metrics.retries.labels(error_class=exc.error_class).inc()
            log.warning("upload_retry_scheduled", path=rel, key=exc.key, attempt=attempt, error=str(exc),
                        error_class=exc.error_class, delay_s=round(delay, 3), layer="journal")
            return self._count("retry")
        self._journal.mark_failed(row.id, error=str(exc), error_class=exc.error_class)
        log.error("upload_failed", path=rel, key=exc.key, attempt=attempt, error=str(exc),
                  error_class=exc.error_class, hint=exc.hint)
        return self._count("failed")

    # -- threads ---------------------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            row = self._queue.get()
            if row is None:
                return
            try:
                self.process(row)
            except JournalError:
                with self._lock:
                    self._stranded.add(row.id)
                log.exception("journal_write_failed", path=path_text(row.path))
            except Exception:
                log.exception("upload_crashed", path=path_text(row.path))
            finally:
                with self._lock:
                    self._inflight -= 1
                    self._idle.notify_all()
                self._wake.set()

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                claimed = self.run_once()
            except JournalError:
                log.exception("journal_read_failed")
                self._stopping.wait(JOURNAL_RETRY_S)  # a full or broken journal: do not spin on it (_wake may be set)
                continue
            if claimed:
                continue
            due = self._journal_due()
            wait = min(1.0, due if due is not None else 1.0, self.breaker.wait_s() or 1.0)
            self._wake.wait(timeout=max(0.01, wait))
            self._wake.clear()

    def _journal_due(self) -> float | None:
        try:
            return self._journal.next_due_in()
        except JournalError:
            return None

    def start(self) -> None:
        """Start the dispatcher and the workers (daemon threads: a forced exit never waits for them)."""
        for n in range(self._workers):
            thread = threading.Thread(target=self._worker, name=f"upload-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        dispatcher = threading.Thread(target=self._dispatch, name="upload-dispatch", daemon=True)
        dispatcher.start()
        self._threads.append(dispatcher)

    def alive(self) -> bool:
        """True while every worker and the dispatcher run (False before start and after stop)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def stop(self, timeout: float) -> bool:
        """Stop claiming; give in-flight uploads ``timeout`` seconds. True if all of them finished."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight > 0 and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(timeout=left)
            drained = self._inflight == 0
        for _ in range(self._workers):
            self._queue.put(None)
        return drained

    def _on_progress(self, done: int, total: int) -> None:
        """Progress of this thread's multipart upload: a gauge, and a log line at a bounded rate."""
        state = self._progress.__dict__
        now = time.monotonic()
        if done <= 0 or state.get("total") != total or done < state.get("done", 0):
            self._end_progress()
            state.update(total=total, done=0, started=now, logged=now)
        self._metrics.upload_progress.inc(done - state["done"])
        state["done"] = done
        if now - state["logged"] >= PROGRESS_EVERY_S or done >= total:
            rate = done / max(1e-6, now - state["started"])
            log.info("upload_progress", bytes_done=done, bytes_total=total, rate_bps=int(rate))
            state["logged"] = now
        if done >= total:
            self._end_progress()

    def _end_progress(self) -> None:
        """Take this thread's upload out of the in-progress gauge (finished, failed or cut short)."""
        state = self._progress.__dict__
        if state.get("done"):
            self._metrics.upload_progress.dec(state["done"])
        state.clear()
