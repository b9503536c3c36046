"""Reconciliation: walk the whole tree and compare it with the journal — never with a LIST of the bucket.

A file the journal does not know, or knows with another size or mtime, is offered to the settler like
any event. The walk never follows symlinks and skips hidden folders. Journal lookups are batched so a
tree of 100,000 files costs about 200 queries, and the walk pauses while the settler holds more than
``MAX_BACKLOG`` candidates, so memory stays bounded however many files are new.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.filters import PathFilter
from sidecar.journal import Journal
from sidecar.journal_schema import Version
from sidecar.keys import path_text

log = structlog.get_logger("sidecar.scanner")

BATCH = 500
MAX_BACKLOG = 2_000  # candidates held by the settler before the walk pauses
BACKLOG_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What one scan saw and did."""

    files: int
    offered: int
    duration_s: float


class Scanner:
    """Walks ``root`` and offers every new or changed candidate file."""

    def __init__(
        self,
        root: Path,
        *,
        journal: Journal,
        path_filter: PathFilter,
        offer: Callable[[bytes, str], None],
        backlog: Callable[[], int] = lambda: 0,
        max_backlog: int = MAX_BACKLOG,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
    ) -> None:
        self._root = os.fsencode(root)
        self._stop = stop if stop is not None else threading.Event()
        self._backlog = backlog
        self._max_backlog = max_backlog
        self._journal = journal
        self._filter = path_filter
        self._offer = offer
        self._clock = clock

    def scan(self, subdir: bytes = b"") -> ScanResult:
        """Reconcile the whole tree, or only ``subdir`` (relative), against the journal."""
        started = self._clock()
        files = offered = 0
        batch: list[tuple[bytes, Version]] = []
        stopped = False
        for found in self._walk(subdir):
            files += len(found)
            batch += found
            while len(batch) >= BATCH and not stopped:  # a folder of 100,000 new files is offered 500 at a time
                offered += self._reconcile(batch[:BATCH])
                del batch[:BATCH]
                stopped = not self._wait_for_room()
            if stopped:
                break  # shutting down: the next start scans again
        if not stopped:
            offered += self._reconcile(batch)
        return ScanResult(files=files, offered=offered, duration_s=self._clock() - started)

    def _wait_for_room(self) -> bool:
        """Backpressure: a cold start over 100,000 unknown files must not hold them all in memory at once.
        The settler hands confirmed files to the journal (on disk); the walk waits while it is full.
        False when a shutdown cut the wait short."""
        while self._backlog() > self._max_backlog:
            if self._stop.wait(BACKLOG_POLL_S):
                return False
        return not self._stop.is_set()

    def _reconcile(self, batch: list[tuple[bytes, Version]]) -> int:
        changed = self._journal.changed(batch) if batch else []
        for rel in changed:
            self._offer(rel, "scan")
        return len(changed)

    def _walk(self, subdir: bytes) -> Iterator[list[tuple[bytes, Version]]]:
        """The candidate files of each folder, one list per folder (a million files is a hot loop: the per-file
        work stays inline)."""
        start = os.path.join(self._root, subdir) if subdir else self._root
        prefix_len = len(self._root.rstrip(b"/")) + 1
        name_skip, globs = self._filter.raw_name_skip_reason, self._filter.has_globs
        is_reg = stat.S_ISREG
        stack = [start]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("scan_folder_unreadable", path=os.fsdecode(folder), error=exc.strerror)
                continue
            found: list[tuple[bytes, Version]] = []
            for entry in entries:
                # Folders were checked on the way down: a file needs its name checked, and its whole path only
                # for globs. The name comes first, so a file that is no candidate costs no stat.
                try:
                    if entry.is_dir(follow_symlinks=False):  # from the directory entry's type: no stat
                        if self._filter.dir_skip_reason(path_text(entry.path[prefix_len:])) is None:
                            stack.append(entry.path)
                        continue
                    if name_skip(entry.name) is not None or (
                            globs and self._filter.glob_skip_reason(path_text(entry.path[prefix_len:])) is not None):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if is_reg(st.st_mode):
                    found.append((entry.path[prefix_len:], (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)))
            if found:
                yield found
