"""The uploader: a pool of workers draining the journal into the object store. Never imports watchdog.

Every attempt ends in exactly one journal outcome (:mod:`sidecar.outcomes`). A worker that finished a file
takes its next one in the journal write that records the last (:meth:`Uploader._run_one`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import structlog

from sidecar.backoff import RetryPolicy
from sidecar.errors import JournalError, SourceFileError, StoreError
from sidecar.fast_retry import FastRetry
from sidecar.journal import FileRow, Journal
from sidecar.keys import path_text
from sidecar.localfile import source_error
from sidecar.metrics import Metrics
from sidecar.outcomes import Outcomes
from sidecar.progress import Progress
from sidecar.store_health import StoreHealth
from sidecar.transfer import AwaitingPrompt, FileChanged, Retry, Transfer

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
        self.health = health
        self._settle_s = settle_s
        self._clock = clock
        self.outcomes = Outcomes(journal, policy=policy, metrics=metrics, health=health, clock=clock)
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
        self._progress = Progress(metrics)
        self.retry = FastRetry(health, metrics, self._stopping)
        self._transfer = transfer_factory(self.retry, self._progress.update)
        # Set by the composition root: an attempt ended (jobs may be stored now). See also outcomes.on_*.
        self.on_outcome: Callable[[], None] = lambda: None
        health.on_change.append(lambda state: self.wake())

    @property
    def last_key(self) -> str:
        return self.outcomes.last_key

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
        """Rows whose outcome could not be written (journal full), and rows a worker claimed with an outcome whose
        report then failed, go back to pending once the journal takes writes again.

        Left alone they would stay ``uploading`` until the next start. Uploading them again is safe: a key we
        already wrote answers 412 and a HEAD shows our MD5.
        """
        with self._lock:
            stranded = list(self._stranded.values())
        for row in stranded:
            self._journal.mark_retry(row, error="handed back: the outcome of an attempt could not be recorded in full",
                                     error_class="JournalError", delay_s=0, count=False)
            with self._lock:
                self._stranded.pop(row.id, None)

    def process(self, row: FileRow) -> str:
        """Upload one claimed row and record the outcome in the journal; returns the outcome label."""
        return self._attempt(row, pull=False)[0]

    def _attempt(self, row: FileRow, *, pull: bool) -> tuple[str, list[FileRow] | None]:  # noqa: PLR0911
        """:meth:`process`; with ``pull``, a success also claims the worker's next row in its journal write
        (the rows claimed; None when no claim was made: another outcome, or claiming is off)."""
        started = time.monotonic()
        try:
            result = self._transfer.run(row)
        except AwaitingPrompt as exc:  # not an attempt: due again when the prompt is named, or the wait ends
            self._journal.mark_retry(row, error=str(exc), error_class="awaiting_prompt", delay_s=exc.left_s,
                                     count=False)
            self.outcomes.on_held()
            return "held", None
        except FileChanged:
            changed = "the file changed while it was read"
            return self.outcomes.retry_later(row, changed, "FileChanged", base=self._settle_s), None
        except SourceFileError as exc:
            return self.outcomes.source_problem(row, exc), None
        except StoreError as exc:
            return self.outcomes.store_problem(row, exc), None
        except OSError as exc:  # a read(2) that failed half-way: EIO, ESTALE, ...
            return self.outcomes.source_problem(row, source_error(exc, path_text(row.path))), None
        except JournalError:
            raise
        except Exception as exc:  # a bug or a dependency's surprise: never strand the row
            log.exception("upload_crashed", path=path_text(row.path))
            return self.outcomes.retry_later(row, f"{type(exc).__name__}: {exc}", type(exc).__name__), None
        finally:
            self._progress.end()
        duration = time.monotonic() - started
        claim = pull and self._may_pull()
        pulled = self.outcomes.succeeded(row, result, then_claim=int(claim))
        try:
            self.outcomes.report_success(row, result, duration)
        except BaseException:
            self._hand_back(pulled)  # claimed with this outcome and never started: not left in uploading
            raise
        return self.outcomes.count(result.outcome), pulled if claim else None

    def _hand_back(self, rows: list[FileRow]) -> None:
        with self._lock:
            for row in rows:
                self._stranded[row.id] = row
        self._wake.set()

    # -- threads ---------------------------------------------------------------------------------------

    def _worker(self) -> None:
        """Take a row from the dispatcher, then keep pulling due rows from the journal while there are any.

        A success claims the next row in the journal write that records it, so in a backlog a worker goes
        from file to file with one commit each and no hand-off; the dispatcher only wakes idle workers.
        """
        row = self._queue.get()
        while row is not None:
            row = self._run_one(row)
            if row is None:
                with self._lock:
                    self._inflight -= 1
                    self._idle.notify_all()
                row = self._queue.get()

    def _run_one(self, row: FileRow) -> FileRow | None:
        """One attempt and its bookkeeping; returns the worker's next claimed row, None when nothing is due."""
        pulled: list[FileRow] | None = None  # None: no claim was made with the outcome (or it failed)
        later = stranded = False
        try:
            outcome, pulled = self._attempt(row, pull=True)
            later = outcome in LATER
            if later:
                with self._lock:
                    self._later += 1  # due later: the next due time the dispatcher remembers may be too late
        except Exception as exc:  # the outcome could not be written: hand the row back (_release_stranded)
            stranded = True
            with self._lock:
                self._stranded[row.id] = row
            log.exception("journal_write_failed" if isinstance(exc, JournalError) else "upload_crashed",
                          path=path_text(row.path))
        self.on_outcome()
        if pulled is None and not (later or stranded) and self._may_pull():
            pulled = self._pull()  # an outcome that claimed nothing with it: a claim of its own
        if pulled:
            return pulled[0]
        if pulled is None or later:
            # Idle with something left for the dispatcher: a row due later to time, a stranded row to hand
            # back, a claim that failed, or claiming that stopped. An empty claim needs no second look.
            self._wake.set()
        return None

    def _may_pull(self) -> bool:
        return not self._stopping.is_set() and self.health.may_claim()

    def _pull(self) -> list[FileRow] | None:
        """Claim one due row for this worker; None if the journal refused (the dispatcher reports it)."""
        try:
            return self._journal.claim(1)
        except JournalError:
            return None

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

