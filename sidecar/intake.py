"""Intake: the first stage of a file's path. Watcher events and scan findings come in; the canary is
answered, the filter applied, the settler offered the candidate, and what the settler confirms finished
is recorded in the journal (which wakes the uploader).

    watcher / scanner ──▶ Intake.on_path ──▶ Settler ──▶ Intake.on_ready ──▶ Journal ──▶ Uploader
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import structlog

from sidecar.filters import PathFilter
from sidecar.health import Canary
from sidecar.journal import Candidate, Journal
from sidecar.keys import path_text
from sidecar.metrics import Metrics
from sidecar.settle import Settler

log = structlog.get_logger("sidecar.intake")

EVENT_SOURCES = {"close": "event", "create": "event", "modify": "event", "move": "event", "scan": "scan"}
SKIP_MEMORY = 4096  # paths whose skip was counted recently: one count per file, not one per event


class Intake:
    """Routes candidate paths to the settler and finished files to the journal."""

    def __init__(
        self, *, canary: Canary, path_filter: PathFilter, settler: Settler, journal: Journal, metrics: Metrics,
        wake: Callable[[], None], want_dir: Callable[[bytes], None],
    ) -> None:
        self._canary = canary
        self._filter = path_filter
        self._settler = settler
        self._journal = journal
        self._metrics = metrics
        self._wake = wake
        self._want_dir = want_dir
        self._lock = threading.Lock()
        self._skipped: OrderedDict[bytes, None] = OrderedDict()
        self._last: tuple[bytes, str | None] = (b"", None)  # the last path's filter verdict (one tuple: atomic)

    def on_path(self, rel: bytes, source: str) -> None:
        """A file was created, written, closed or moved in (or a scan found it): maybe a candidate."""
        if self._canary.matches(rel):
            self._canary.seen()
            return
        last_rel, last_reason = self._last  # a file being written sends its events in a row: filter it once
        reason = last_reason if rel == last_rel else self._filter.skip_reason(path_text(rel))
        self._last = (rel, reason)
        if reason is None:
            self._settler.offer(rel, source)
        elif reason != "hidden" and self._first_skip(rel):
            self._metrics.files_skipped.labels(reason=reason).inc()

    def _first_skip(self, rel: bytes) -> bool:
        with self._lock:
            if rel in self._skipped:
                self._skipped.move_to_end(rel)
                return False
            self._skipped[rel] = None
            if len(self._skipped) > SKIP_MEMORY:
                self._skipped.popitem(last=False)
            return True

    def on_dir(self, rel: bytes) -> None:
        """A new or moved-in folder: files written before its watch existed get no events. Scan it."""
        if self._filter.dir_skip_reason(path_text(rel)) is None:
            self._want_dir(rel)

    def on_ready(self, candidates: list[Candidate]) -> None:
        """The settler confirmed these files finished: record them; the uploader takes it from there."""
        for c in self._journal.record(candidates):
            self._metrics.files_discovered.labels(source=EVENT_SOURCES.get(c.source, "event")).inc()
            log.debug("file_queued", path=path_text(c.path), bytes=c.size, source=c.source)
        self._wake()
