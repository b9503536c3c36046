"""The stability check: a candidate becomes a journal entry only once it is finished.

ComfyUI writes PNGs and videos in place, so an event (even a close) is only a *candidate*. A candidate
is confirmed when two stats ``settle_s`` apart agree (size, mtime, inode) and no process holds the file
open for writing (a kernel read lease, see :mod:`sidecar.localfile`). Where the kernel cannot tell, a
candidate that did not come from a close event waits a longer quiet period instead. Offering a path is
O(1) and thread-safe, so the watcher's handler never blocks.
"""

from __future__ import annotations

import heapq
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from sidecar.errors import SourceFileError
from sidecar.journal import Candidate
from sidecar.keys import path_text
from sidecar.localfile import open_regular, same_version, writer_holds

log = structlog.get_logger("sidecar.settle")

NO_LEASE_QUIET_S = 2.0  # quiet period when the kernel cannot say whether a writer still has the file open
MAX_RECHECK_S = 2.0
RETRY_HANDOVER_S = 1.0
WRITER_DONE = frozenset({"close", "move"})


@dataclass(slots=True)
class _Entry:
    source: str
    due: float
    seen: os.stat_result | None = None
    rechecks: int = 0
    first_offered: float = field(default=0.0)
    offers: int = 1  # bumped by every offer, so a hand-over can tell that a new event came in meanwhile


class Settler:
    """Holds candidate paths until finished, then hands them over in batches to ``on_ready``."""

    def __init__(
        self,
        root: Path,
        *,
        settle_s: float,
        on_ready: Callable[[list[Candidate]], None],
        on_skip: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._root_b = os.fsencode(root)
        self._settle_s = settle_s
        self._on_ready = on_ready
        self._on_skip = on_skip
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._wake = threading.Event()

    def offer(self, relpath: bytes, source: str) -> None:
        """Consider ``relpath`` (relative to the root).

        A path already held keeps its place, except that a close or rename (the writer is done) makes its
        next check due now instead of after a backoff that grew while the writer held the file.
        """
        now = self._clock()
        with self._lock:
            entry = self._entries.get(relpath)
            if entry is None:
                entry = self._entries[relpath] = _Entry(source=source, due=now, first_offered=now)
                heapq.heappush(self._heap, (now, relpath))
            elif source != "scan":
                entry.offers += 1
                entry.source = source
                if source in WRITER_DONE and entry.due > now:
                    entry.due, entry.rechecks = now, 0
                    heapq.heappush(self._heap, (now, relpath))
        self._wake.set()

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
        if entry.seen is None and self._first_look(relpath, entry, now):
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
            writer = writer_holds(fd)
        finally:
            os.close(fd)
        stable = entry.seen is not None and same_version(entry.seen, st)
        quiet = self._settle_s
        if writer is None and entry.source != "close":
            quiet = max(quiet, NO_LEASE_QUIET_S)
        if stable and not writer and now - entry.first_offered >= quiet:
            return Candidate(path=relpath, size=st.st_size, mtime_ns=st.st_mtime_ns, source=entry.source)
        if not stable:
            entry.seen = st
            entry.rechecks = 0
        entry.rechecks += 1
        backoff = self._settle_s * (2 ** min(entry.rechecks - 1, 5)) if writer else self._settle_s
        entry.due = now + max(0.01, min(backoff, MAX_RECHECK_S))
        return None

    def _first_look(self, relpath: bytes, entry: _Entry, now: float) -> bool:
        """A plain lstat records the first version of a regular file (half the cost of the full check, which
        opens it safely and asks for writers); True when that was all there was to do this time."""
        try:
            st = os.lstat(os.path.join(self._root_b, relpath))
        except OSError:
            return False  # the full check names the reason
        if not stat.S_ISREG(st.st_mode):
            return False
        entry.seen, entry.rechecks = st, 1
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
