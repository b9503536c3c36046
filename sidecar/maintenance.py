"""The maintenance loop: everything that keeps the path of files honest but is not on it.

One :meth:`Maintenance.run_once` per wake-up (at least every ``CHECK_EVERY_S``): the scans that were asked
for (startup, overflow, a new folder, the periodic reconciliation), the watcher canary and its repair,
the inotify coverage check, the journal's own check (still our file, still committing), and the abort
of multipart uploads left open. Each step is independent; a failing one is logged and the rest run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from sidecar.errors import SidecarError, StoreError
from sidecar.health import Canary
from sidecar.journal import Journal
from sidecar.keys import path_text
from sidecar.logs import RateLimitedLog
from sidecar.metrics import Metrics
from sidecar.mounts import mounts_under
from sidecar.scanner import Scanner
from sidecar.settle import Settler
from sidecar.store import ObjectStore
from sidecar.store_health import StoreHealth
from sidecar.watcher import LIMIT_HINT, Watcher
from sidecar.writercheck import MODES, WriterCheck, choose

log = structlog.get_logger("sidecar.daemon")

CHECK_EVERY_S = 2.0
ORPHAN_EVERY_S = 60.0


class Maintenance:
    """Scans, watcher repair, journal checks and orphan aborts, on one thread."""

    def __init__(
        self, *, root: Path, state_dir: Path, scan_interval_s: float, scanner: Scanner, watcher: Watcher,
        canary: Canary, settler: Settler, journal: Journal, store: ObjectStore, health: StoreHealth,
        metrics: Metrics, on_journal_lost: Callable[[str], None],
    ) -> None:
        self._root, self._state_dir = root, state_dir
        self._interval_s = scan_interval_s
        self.scanner, self.watcher, self.canary = scanner, watcher, canary
        self._settler, self._journal, self._store, self._health = settler, journal, store, health
        self._metrics = metrics
        self._on_journal_lost = on_journal_lost
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._dirs: set[bytes] = set()
        self._trigger = "startup"
        self._next_full = time.monotonic() + scan_interval_s
        self._next_orphans = 0.0
        self._watcher_log = RateLimitedLog(log, interval_s=60.0)  # a root that stays unusable retries every 2 s
        self.last_scan: dict[str, Any] = {}
        self.writer_check: WriterCheck | None = None
        self.journal_problem: str | None = None
        self._mounts: frozenset[bytes] | None = mounts_under(root)

    # -- requests from other threads --------------------------------------------------------------------

    def request_scan(self, trigger: str) -> None:
        """Ask for a full reconciliation scan as soon as possible."""
        with self._lock:
            self._dirs.add(b"")
            self._trigger = trigger
        self._wanted.set()

    def want_dir(self, rel: bytes) -> None:
        with self._lock:
            self._dirs.add(rel)
        self._wanted.set()

    def on_overflow(self) -> None:
        self._metrics.watcher_overflows.inc()
        log.warning("watcher_overflow", action="full_rescan")
        self.request_scan("overflow")

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wanted.wait(timeout=min(CHECK_EVERY_S, max(0.0, self._next_full - time.monotonic())))
            self._wanted.clear()
            if stop.is_set():
                return
            self.run_once()

    def wake(self) -> None:
        self._wanted.set()

    def run_once(self) -> None:
        for step in (self._scans, self._check_watcher, self._check_watch_coverage, self._check_mounts,
                     self._check_journal, self._abort_orphans):
            try:
                step()
            except SidecarError:
                log.exception("maintenance_failed", step=step.__name__.lstrip("_"))
            except OSError as exc:
                log.error("maintenance_failed", step=step.__name__.lstrip("_"), error=exc.strerror or str(exc))

    def _scans(self) -> None:
        with self._lock:
            dirs, self._dirs = self._dirs, set()
            trigger = self._trigger
        if time.monotonic() >= self._next_full:
            dirs.add(b"")
            trigger = "periodic"
        if b"" in dirs:
            self.scan(trigger)
            self._next_full = time.monotonic() + self._interval_s
            return
        for rel in sorted(dirs):
            self.scan("folder", rel)

    def scan(self, trigger: str, subdir: bytes = b"") -> None:
        """Reconcile (part of) the tree with the journal now, on the calling thread."""
        result = self.scanner.scan(subdir)
        if subdir:
            log.debug("folder_scanned", path=path_text(subdir), files=result.files, queued=result.offered)
            return
        self._metrics.rescans.labels(trigger=trigger).inc()
        self._metrics.scan_duration.observe(result.duration_s)
        self.last_scan = {"trigger": trigger, "files": result.files, "offered": result.offered,
                          "duration_s": round(result.duration_s, 3), "at": time.time()}
        log.info("scan_completed", trigger=trigger, files=result.files, offered=result.offered,
                 duration_s=round(result.duration_s, 3))

    # -- the watcher ------------------------------------------------------------------------------------

    def _check_watcher(self) -> None:
        """Prove the watcher delivers events; rebuild it (and rescan) when it has gone deaf."""
        if self.watcher.mode == "none":
            return
        was_healthy = self.canary.healthy
        grace = 3.0 if self.watcher.mode == "inotify" else 4 * 2.0
        verdict = self.canary.check(self.watcher.is_alive(), grace_s=grace)
        if verdict == "deaf":
            if was_healthy:
                log.warning("watcher_degraded", reason=self.canary.reason, mode=self.watcher.mode)
            self.restart_watcher(self.canary.reason)
        elif verdict == "ok":
            self._watcher_log.recovered("watcher_recovered", mode=self.watcher.mode)
        self._metrics.watcher_up.set(1 if self.canary.healthy else 0)

    def _check_watch_coverage(self) -> None:
        """A new folder the inotify watch limit skipped gets no events, silently (FIELD-NOTES §1): poll instead."""
        gap = self.watcher.coverage_gap()
        if gap is None:
            return
        self.watcher.degrade_to_polling(gap)
        log.warning("watcher_degraded", reason=self.watcher.degraded_reason, mode="polling", hint=LIMIT_HINT)
        self.restart_watcher("watch_limit")

    def _check_mounts(self) -> None:
        """A filesystem mounted (or unmounted) below the root since the watch was set: watch it, rescan."""
        if self.watcher.mode != "inotify":
            return  # polling stats paths, and sees through mounts by itself
        found = mounts_under(self._root)
        if found is None or found == self._mounts:
            return
        before, self._mounts = self._mounts or frozenset(), found
        log.warning("mounts_changed", added=sorted(path_text(m) for m in found - before),
                    removed=sorted(path_text(m) for m in before - found), action="rebuilding the watcher")
        self.restart_watcher("mount_changed")

    def restart_watcher(self, reason: str) -> None:
        """Rebuild the observer, re-arm the canary and rescan; a root that cannot be watched stays deaf."""
        self._metrics.watcher_restarts.labels(reason=reason).inc()
        try:
            self.watcher.restart()
            self.canary.arm()  # after the new watch exists, or its event can never come back
        except OSError as exc:
            self._watcher_log.error("watcher_restart_failed", reason=reason, path=str(self._root),
                                    error=exc.strerror or str(exc))
            return
        finally:
            self.set_mode_metric()
        self.choose_writer_check()
        self.request_scan("watcher_restart")

    def set_mode_metric(self) -> None:
        for mode in ("inotify", "polling"):
            self._metrics.watcher_mode.labels(mode=mode).set(1 if self.watcher.mode == mode else 0)

    def choose_writer_check(self) -> None:
        """Probe which writer check holds here (sidecar.writercheck); log it once, and again if it changes."""
        found = choose([self._root, self._state_dir], self.watcher.mode)
        if self.writer_check is None or found.mode != self.writer_check.mode:
            (log.info if found.mode != "quiet" else log.warning)("writer_check", **found.as_dict())
        self.writer_check = found
        self._settler.mode = found.mode
        for mode in MODES:
            self._metrics.writer_check.labels(mode=mode).set(1 if found.mode == mode else 0)

    # -- the journal and the store ------------------------------------------------------------------------

    def _check_journal(self) -> None:
        """The journal must still be the file we opened, and commit: else say so loudly, once."""
        problem = self._journal.problem()
        if problem == self.journal_problem:
            return
        self.journal_problem = problem
        if problem is None:
            log.warning("journal_recovered")
            return
        kind = "deleted" if "deleted" in problem else "replaced" if "replaced" in problem else "commit_failed"
        self._metrics.journal_problems.labels(problem=kind).inc()
        log.error("journal_unusable", problem=problem, kind=kind)
        if kind != "commit_failed":
            self._on_journal_lost(problem)

    def _abort_orphans(self) -> None:
        """Multipart uploads whose abort failed stay in the journal until an abort succeeds."""
        if time.monotonic() < self._next_orphans or not self._health.may_claim():
            return
        self._next_orphans = time.monotonic() + ORPHAN_EVERY_S
        for key, upload_id in self._journal.orphans():
            try:
                self._store.abort_multipart(key, upload_id)
            except StoreError as exc:
                log.warning("multipart_orphan_abort_failed", key=key, error=str(exc))
                return
            self._journal.drop_orphan(upload_id)
            log.info("multipart_orphan_aborted", key=key)
