"""The stability check: a candidate becomes a journal entry only once it is finished.

ComfyUI writes PNGs and videos in place, so an event (even a close) is only a *candidate*. A candidate
whose last event is its writer's close is confirmed at once, unless the kernel says a writer still holds
it (a read lease refused). Any other candidate (seen by a create, a rename or a scan) is confirmed when two
stats ``settle_s`` apart agree (size, mtime, inode) and the writer check says no writer is left
(:mod:`sidecar.writercheck`): a kernel read lease where the kernel answers for the file; otherwise, in
``events`` mode, a close or move event after the last modify event seen, or, with no such evidence (and
in ``quiet`` mode), ``quiet_s`` without any change, measured from the last change observed. The decision
table is in docs/ARCHITECTURE.md.
Offering a path is O(1) and thread-safe, so the watcher's handler never blocks.
"""

from __future__ import annotations

import heapq
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.errors import SourceFileError
from sidecar.journal import Candidate
from sidecar.keys import path_text
from sidecar.localfile import open_regular, same_version, writer_holds

log = structlog.get_logger("sidecar.settle")

MAX_RECHECK_S = 2.0
RETRY_HANDOVER_S = 1.0
WRITER_DONE = frozenset({"close", "move"})
CHANGES = frozenset({"modify", "create"})
EMPTY_QUIET_FACTOR = 4  # an empty file with no writer evidence waits longer: a writer may not have begun
# The kernel sends IN_CLOSE_WRITE from __fput *before* it drops the file's write count (put_write_access comes
# last), so a lease asked for the moment the close event is read can still be refused for the writer that
# just closed. Look again soon rather than after the settle backoff.
CLOSE_RACE_S = 0.01
CLOSE_RACE_TRIES = 3
CLOSE_TIMEOUT_S = 60.0  # events mode: a modified file with no close for this long (truncate(2), mmap) goes on


@dataclass(slots=True)
class _Entry:
    source: str
    due: float
    seen: os.stat_result | None = None
    seen_at: float = 0.0  # when the version in ``seen`` was first observed: the last change is no later
    changed_at: float = 0.0  # the last modify or create event
    writing: bool = False  # a modify event came in after the last close or move: a writer was at work
    closed: bool = False  # a close or move event came in after the last change event
    rechecks: int = 0
    offers: int = 1  # bumped by every offer, so a hand-over can tell that a new event came in meanwhile

    def note(self, source: str, now: float) -> None:
        """Fold one event into what is known of the writer."""
        if source in CHANGES:
            self.changed_at, self.closed = now, False
            self.writing = self.writing or source == "modify"
        elif source in WRITER_DONE:
            self.closed, self.writing = True, False


class Settler:
    """Holds candidate paths until finished, then hands them over in batches to ``on_ready``."""

    def __init__(
        self,
        root: Path,
        *,
        settle_s: float,
        on_ready: Callable[[list[Candidate]], None],
        on_skip: Callable[[str], None] = lambda reason: None,
        on_confirmed: Callable[[str], None] = lambda check: None,
        quiet_s: float = 3.0,
        mode: str = "events",
        lease: Callable[[int], bool | None] = writer_holds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._root_b = os.fsencode(root)
        self._settle_s = settle_s
        self.quiet_s = max(quiet_s, settle_s)
        self.mode = mode  # the writer check for files the lease cannot answer for; set by the daemon
        self._on_confirmed = on_confirmed
        self._lease = lease
        self._on_ready = on_ready
        self._on_skip = on_skip
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._wake = threading.Event()

    def offer(self, relpath: bytes, source: str) -> None:
        """Consider ``relpath`` (relative to the root).

        ``source`` is the event: ``create``, ``modify``, ``close``, ``move`` or ``scan``. A path already held
        keeps its place, except that a close or rename (the writer is done) makes its next check due now
        instead of after a backoff that grew while the writer held the file.
        """
        now = self._clock()
        sooner = False  # a check became due now: the loop must look (a modify event changes no due time)
        with self._lock:
            entry = self._entries.get(relpath)
            if entry is None:
                entry = self._entries[relpath] = _Entry(source=source, due=now, seen_at=now)
                entry.note(source, now)
                heapq.heappush(self._heap, (now, relpath))
                sooner = True
            elif source != "scan":
                entry.offers += 1
                entry.note(source, now)
                if source != "modify":
                    entry.source = source
                if source in WRITER_DONE and entry.due > now:
                    entry.due, entry.rechecks = now, 0
                    heapq.heappush(self._heap, (now, relpath))
                    sooner = True
        if sooner:
            self._wake.set()  # not for the ~40 modify events of a PNG being written: each was a wasted loop

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def next_due_in(self) -> float | None:
        """Seconds until the next check is due, None if nothing is held."""
        with self._lock:
            return max(0.0, self._heap[0][0] - self._clock()) if self._heap else None

    def run_once(self) -> int:
        """Check every candidate that is due; hand the finished ones over. Returns how many were confirmed."""
        now = self._clock()
        due: dict[bytes, _Entry] = {}  # a path can sit in the heap twice (see offer); check it once
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, relpath = heapq.heappop(self._heap)
                entry = self._entries.get(relpath)
                if entry is not None and entry.due <= now:
                    due[relpath] = entry
        ready: list[tuple[Candidate, int]] = []
        for relpath, entry in due.items():
            offers = entry.offers
            verdict = self._check(relpath, entry, now)
            with self._lock:
                if verdict is None:
                    if entry.offers != offers and entry.closed:
                        # The writer closed while this check ran (the reader thread is that quick): the
                        # close's "look now" was overwritten by the check's own next due time.
                        entry.due = min(entry.due, now)
                    heapq.heappush(self._heap, (entry.due, relpath))
                elif isinstance(verdict, Candidate):
                    ready.append((verdict, offers))
                else:
                    del self._entries[relpath]
        if ready:
            # Entries stay held until the journal has them: len(self) never reads 0 while files are in
            # hand, and a failed hand-over (journal full) keeps them for another try.
            try:
                self._on_ready([c for c, _ in ready])
            except Exception:
                self._release(ready, keep_until=now + RETRY_HANDOVER_S)
                raise
            self._release(ready, keep_until=None)
        return len(ready)

    def _release(self, handed: list[tuple[Candidate, int]], *, keep_until: float | None) -> None:
        """Forget handed-over entries; keep (due at ``keep_until`` or now) those offered again meanwhile."""
        now = self._clock()
        with self._lock:
            for candidate, offers in handed:
                entry = self._entries.get(candidate.path)
                if entry is None:
                    continue
                if keep_until is None and entry.offers == offers:
                    del self._entries[candidate.path]
                    continue
                entry.due = keep_until if keep_until is not None else now
                entry.seen = None
                heapq.heappush(self._heap, (entry.due, candidate.path))

    def _check(self, relpath: bytes, entry: _Entry, now: float) -> Candidate | str | None:
        """A Candidate when finished, a skip reason when never uploadable, None to look again at entry.due."""
        at_close = entry.closed and entry.source == "close"  # the writer's own close came last: no settle
        if not at_close and entry.seen is None and self._first_look(relpath, entry, now):
            return None
        try:
            fd, st = open_regular(self._root, relpath)
        except SourceFileError as exc:
            self._on_skip(exc.reason)
            # One line per skipped candidate: a FIFO, a link or a file we may not read named like an output
            # is otherwise invisible except as a counter (the scan offers an unreadable file again each time).
            log.info("candidate_skipped", path=path_text(relpath), reason=exc.reason)
            return exc.reason
        try:
            writer = self._lease(fd)
        finally:
            os.close(fd)
        if entry.seen is None or not same_version(entry.seen, st):
            entry.seen, entry.seen_at, entry.rechecks = st, now, 0
            stable = False
        else:
            stable = True
        check = self._at_close(writer) if at_close else None
        if check is None and stable:
            check = self._finished(relpath, entry, writer, st, now)
        if check is not None:
            self._on_confirmed(check)
            return Candidate(path=relpath, size=st.st_size, mtime_ns=st.st_mtime_ns, source=entry.source,
                             ino=st.st_ino, ctime_ns=st.st_ctime_ns)
        entry.rechecks += 1
        if writer and at_close and entry.rechecks <= CLOSE_RACE_TRIES:
            backoff = CLOSE_RACE_S
        elif writer:
            backoff = self._settle_s * (2 ** min(entry.rechecks - 1, 5))
        elif writer is None and stable and entry.writing and self.mode == "events":
            backoff = MAX_RECHECK_S  # waiting for the close event, which brings the next check forward (offer)
        elif writer is None and stable:
            backoff = self._quiet_for(entry, st) - (now - self._last_change(entry))
        else:
            backoff = self._settle_s
        entry.due = now + max(0.01, min(backoff, MAX_RECHECK_S))
        return None

    def _at_close(self, writer: bool | None) -> str | None:
        """A close event came after the last change: finished unless the kernel says a writer is left.

        No second stat: the close is the writer saying it is done, and the upload proves the version it
        read is the one confirmed (size, mtime, inode, ctime; else it waits for the next events).
        """
        if writer is False:
            return "lease"
        return "close_event" if writer is None and self.mode == "events" else None

    def _finished(
        self, relpath: bytes, entry: _Entry, writer: bool | None, st: os.stat_result, now: float
    ) -> str | None:
        """How a stable file is known to be finished (``lease``, ``close_event``, ``quiet_period``,
        ``close_timeout``), or None while it may still be written. See the module docstring."""
        if writer is not None:
            return None if writer else "lease"
        quiet_for = now - self._last_change(entry)
        if self.mode == "events" and entry.closed:
            return "close_event"
        if self.mode == "events" and entry.writing:
            if quiet_for < CLOSE_TIMEOUT_S:
                return None
            log.warning("writer_check_timeout", path=path_text(relpath), quiet_s=round(quiet_for, 1),
                        hint="modified without a close event (truncate, mmap?): taken as finished")
            return "close_timeout"
        return "quiet_period" if quiet_for >= self._quiet_for(entry, st) else None

    def _quiet_for(self, entry: _Entry, st: os.stat_result) -> float:
        return self.quiet_s * (EMPTY_QUIET_FACTOR if st.st_size == 0 else 1)

    @staticmethod
    def _last_change(entry: _Entry) -> float:
        return max(entry.seen_at, entry.changed_at)

    def _first_look(self, relpath: bytes, entry: _Entry, now: float) -> bool:
        """A plain lstat records the first version of a regular file (half the cost of the full check, which
        opens it safely and asks for writers); True when that was all there was to do this time."""
        try:
            st = os.lstat(os.path.join(self._root_b, relpath))
        except OSError:
            return False  # the full check names the reason
        if not stat.S_ISREG(st.st_mode):
            return False
        entry.seen, entry.seen_at, entry.rechecks = st, now, 1
        entry.due = now + max(0.01, self._settle_s)
        return True

    # -- thread ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set, sleeping until the next due check or a new offer."""
        while not stop.is_set():
            wait = self.next_due_in()
            self._wake.wait(timeout=1.0 if wait is None else min(wait, 1.0))
            self._wake.clear()
            if stop.is_set():
                return
            try:
                self.run_once()
            except Exception:
                log.exception("settle_loop_failed")
                stop.wait(1.0)
