"""The uploader: a pool of workers draining the journal into the object store. Never imports watchdog.

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

import queue
import threading
import time
from collections.abc import Callable

import structlog

from sidecar.backoff import RetryPolicy, backoff
from sidecar.errors import JournalError, SourceFileError, StoreError
from sidecar.fast_retry import FastRetry
from sidecar.journal import FileRow, Journal
from sidecar.keys import path_text
from sidecar.localfile import source_error
from sidecar.metrics import Metrics
from sidecar.progress import Progress
from sidecar.store_health import PARK, PAUSE, StoreHealth
from sidecar.transfer import AwaitingPrompt, FileChanged, Result, Retry, Transfer

log = structlog.get_logger("sidecar.uploader")

JOURNAL_RETRY_S = 1.0
IDLE_WAIT_S = 1.0
LATER = frozenset({"retry", "paused", "held"})  # outcomes that leave the row pending, due some time later


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
        health: StoreHealth,
        settle_s: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._journal = journal
        self._policy = policy
        self._metrics = metrics
        self.health = health
        self._settle_s = settle_s
        self._clock = clock
        self._workers = workers
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._queue: queue.Queue[FileRow | None] = queue.Queue()
        self._lock = threading.Lock()
        self._inflight = 0
        self._stranded: dict[int, FileRow] = {}  # claimed rows whose outcome the journal refused
        self._later = 0  # rows this process left due later (bumped by workers); see _due_in
        self._due: tuple[int, float | None] | None = None  # (_later when asked, next due time by the clock)
        self._idle = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self.last_key = ""
        self._progress = Progress(metrics)
        self.retry = FastRetry(health, metrics, self._stopping)
        self._transfer = transfer_factory(self.retry, self._progress.update)
        # Set by the composition root: an attempt ended (jobs may be stored now), a file was held for its prompt.
        self.on_outcome: Callable[[], None] = lambda: None
        self.on_held: Callable[[], None] = lambda: None
        self.on_stored: Callable[[FileRow, Result], None] = lambda row, result: None  # an object was written
        health.on_change.append(lambda state: self.wake())

    # -- dispatch -----------------------------------------------------------------------------------

    def wake(self) -> None:
        """New work may be due (or the store is back): claim now instead of at the next tick."""
        self._wake.set()

    def run_once(self) -> int:
        """Claim as many due rows as there are idle workers (none while the store is unhealthy); queue them."""
        if self._stopping.is_set():
            return 0
        self._release_stranded()
        free = self._free()
        if free <= 0 or not self.health.may_claim():
            return 0
        rows = self._journal.claim(free)
        with self._lock:
            self._inflight += len(rows)
        for row in rows:
            self._queue.put(row)
        return len(rows)

    def _free(self) -> int:
        with self._lock:
            return self._workers - self._inflight

    def _release_stranded(self) -> None:
        """Rows whose outcome could not be written (journal full) go back to pending once it takes writes again.

        Left alone they would stay ``uploading`` until the next start. Uploading them again is safe: a key we
        already wrote answers 412 and a HEAD shows our MD5.
        """
        with self._lock:
            stranded = list(self._stranded.values())
        for row in stranded:
            self._journal.mark_retry(row, error="the journal refused the outcome of the last attempt",
                                     error_class="JournalError", delay_s=0, count=False)
            with self._lock:
                self._stranded.pop(row.id, None)

    def process(self, row: FileRow) -> str:  # noqa: PLR0911 - one outcome per kind of failure
        """Upload one claimed row and record the outcome in the journal; returns the outcome label."""
        started = time.monotonic()
        try:
            result = self._transfer.run(row)
        except AwaitingPrompt as exc:  # not an attempt: due again when the prompt is named, or the wait ends
            self._journal.mark_retry(row, error=str(exc), error_class="awaiting_prompt", delay_s=exc.left_s,
                                     count=False)
            self.on_held()
            return "held"
        except FileChanged:
            return self._retry_later(row, "the file changed while it was read", "FileChanged", base=self._settle_s)
        except SourceFileError as exc:
            return self._source_problem(row, exc)
        except StoreError as exc:
            return self._store_problem(row, exc)
        except OSError as exc:  # a read(2) that failed half-way: EIO, ESTALE, ...
            return self._source_problem(row, source_error(exc, path_text(row.path)))
        except JournalError:
            raise
        except Exception as exc:  # a bug or a dependency's surprise: never strand the row
            log.exception("upload_crashed", path=path_text(row.path))
            return self._retry_later(row, f"{type(exc).__name__}: {exc}", type(exc).__name__)
        finally:
            self._progress.end()
        self._succeeded(row, result, time.monotonic() - started)
        return self._count(result.outcome)

    def _count(self, outcome: str) -> str:
        self._metrics.uploads.labels(outcome=outcome).inc()
        return outcome

    def _succeeded(self, row: FileRow, result: Result, duration: float) -> None:
        self._journal.mark_uploaded(row, uploaded=result.version, md5=result.md5, key=result.key, etag=result.etag)
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

    def _source_problem(self, row: FileRow, exc: SourceFileError) -> str:
        rel = path_text(row.path)
        if exc.reason == "unreadable":
            error_class = f"unreadable/{exc.detail}" if exc.detail else "unreadable"
            if exc.transient:
                return self._retry_later(row, str(exc), error_class)
            self._journal.mark_failed(row, error=str(exc), error_class="unreadable")
            log.error("upload_failed", path=rel, attempt=row.attempts + 1, error=str(exc), error_class="unreadable")
            return self._count("failed")
        self._journal.mark_skipped(row, reason=exc.reason)
        self._metrics.files_skipped.labels(reason=exc.reason).inc()
        (log.warning if exc.reason == "vanished" else log.info)("upload_skipped", path=rel, reason=exc.reason)
        return self._count("skipped")

    def _store_problem(self, row: FileRow, exc: StoreError) -> str:
        verdict = self.health.judge(exc)
        if verdict == PAUSE:  # the store's fault, not the file's: no attempt counted, due once it is healthy
            self._journal.mark_retry(row, error=str(exc), error_class=exc.error_class, delay_s=0, count=False)
            self._metrics.retries.labels(error_class=exc.error_class).inc()
            log.info("upload_retry_scheduled", path=path_text(row.path), key=exc.key, attempt=row.attempts,
                     error=str(exc), error_class=exc.error_class, delay_s=0, layer="pause")
            return self._count("paused")
        if verdict == PARK:
            return self._park(row, exc)
        return self._retry_later(row, str(exc), exc.error_class, key=exc.key, hint=exc.hint)

    def _retry_later(self, row: FileRow, error: str, error_class: str, *, base: float | None = None,
                     key: str = "", hint: str = "") -> str:
        """A counted retry with backoff; parked once the attempts run out."""
        attempt = row.attempts + 1
        if attempt >= self._policy.max_attempts:
            self._journal.mark_failed(row, error=error, error_class=error_class)
            log.error("upload_failed", path=path_text(row.path), key=key, attempt=attempt, error=error,
                      error_class=error_class, hint=hint, reason="attempts_exhausted")
            return self._count("failed")
        delay = backoff(attempt, base=base or self._policy.base_s, cap=self._policy.cap_s)
        self._journal.mark_retry(row, error=error, error_class=error_class, delay_s=delay)
        self._metrics.retries.labels(error_class=error_class.split("/", maxsplit=1)[0]).inc()
        log.warning("upload_retry_scheduled", path=path_text(row.path), key=key, attempt=attempt, error=error,
                    error_class=error_class, delay_s=round(delay, 3), layer="journal")
        return self._count("retry")

    def _park(self, row: FileRow, exc: StoreError) -> str:
        self._journal.mark_failed(row, error=str(exc), error_class=exc.error_class)
        log.error("upload_failed", path=path_text(row.path), key=exc.key, attempt=row.attempts + 1, error=str(exc),
                  error_class=exc.error_class, hint=exc.hint)
        return self._count("failed")

    # -- threads ---------------------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            row = self._queue.get()
            if row is None:
                return
            try:
                if self.process(row) in LATER:
                    with self._lock:
                        self._later += 1  # due later: the next due time the dispatcher remembers may be too late
            except JournalError:
                with self._lock:
                    self._stranded[row.id] = row
                log.exception("journal_write_failed", path=path_text(row.path))
            except Exception:  # the outcome could not be written for another reason: hand it back too
                with self._lock:
                    self._stranded[row.id] = row
                log.exception("upload_crashed", path=path_text(row.path))
            finally:
                with self._lock:
                    self._inflight -= 1
                    self._idle.notify_all()
                self._wake.set()
                self.on_outcome()

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
            # Nothing to claim: sleep until woken (a new file, a finished upload, the store back) or the next
            # row is due. While the store is unhealthy only StoreHealth's change wakes us: no busy loop. With
            # every worker busy, the next one to finish wakes us.
            due = self._due_in() if self._free() > 0 and self.health.may_claim() else None
            if not self._wake.wait(timeout=min(IDLE_WAIT_S, due) if due is not None else IDLE_WAIT_S):
                self._due = None  # a quiet tick: ask the journal again (another process may have queued)
            self._wake.clear()

    def _due_in(self) -> float | None:
        """Seconds until the next pending row is due, None if none is pending.

        Remembered between wake-ups: in a burst, asking the journal after every upload was 9.6% of the daemon's
        Python time. Only this process's retries, pauses and holds create rows due later (each forgets the
        answer), new files come with a wake-up, and rows queued by another process (``sidecar retry-failed``)
        are found at the next quiet tick, within ``IDLE_WAIT_S``.
        """
        later = self._later
        if self._due is None or self._due[0] != later:
            try:
                due = self._journal.next_due_in()
            except JournalError:
                return None
            self._due = (later, None if due is None else self._clock() + due)
        due_at = self._due[1]
        return None if due_at is None else max(0.0, due_at - self._clock())

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

