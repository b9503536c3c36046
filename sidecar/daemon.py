"""The composition root: builds every part, wires them together, and owns the lifecycle.

Start order: journal → store → HTTP → uploader → settler → watcher → maintenance (scans, canary).
Stop in reverse; in-flight uploads get the drain budget, the rest stays pending in the journal.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from sidecar import __version__
from sidecar.backoff import RetryPolicy
from sidecar.config import Settings
from sidecar.errors import ConfigError, SidecarError, StoreError
from sidecar.filters import PathFilter
from sidecar.health import Canary
from sidecar.journal import FAILED, PENDING, UPLOADED, Candidate, Journal
from sidecar.keys import KeyBuilder, path_text
from sidecar.logs import RateLimitedLog
from sidecar.metrics import JournalCollector, Metrics
from sidecar.scanner import Scanner
from sidecar.settle import Settler
from sidecar.store_s3 import S3Store, make_client
from sidecar.transfer import Transfer
from sidecar.uploader import Uploader
from sidecar.watcher import LIMIT_HINT, Watcher
from sidecar.writercheck import MODES, WriterCheck, choose

log = structlog.get_logger("sidecar.daemon")

CHECK_EVERY_S = 2.0
PROBE_EVERY_S = 5.0  # HeadBucket cadence while the store is believed down; never sent while it is fine
EVENT_SOURCES = {"close": "event", "create": "event", "modify": "event", "move": "event", "scan": "scan"}
# Answers that mean the bucket is reachable but unusable with this configuration (credentials, permissions,
# bucket name). A 404 is only such an answer where no key is involved; HeadObject's 404 is routine.
BROKEN_STATUSES = frozenset({"401", "403"})
BUCKET_OPERATIONS = frozenset({"HeadBucket", "PutObject", "CreateMultipartUpload"})


class Daemon:
    """One sidecar: watches ``settings.watch_dir`` and uploads into ``settings.bucket``."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        settings.require_bucket()
        self.settings = settings
        self.root = settings.watch_dir
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.journal = Journal(settings.journal_path)
        self.registry.register(JournalCollector(self.journal.stats, self.journal.oldest_pending_age))
        secrets = [s.get_secret_value() for s in (settings.access_key_id, settings.secret_access_key) if s]
        self.store = S3Store(make_client(settings), settings.bucket, secrets=secrets, observer=self._on_request)
        self.filter = PathFilter(settings.extensions, settings.include, settings.exclude)
        keys = KeyBuilder(settings.key_template, settings.pod_id)
        self.settler = Settler(self.root, settle_s=settings.settle_s, on_ready=self._on_ready,
                               on_skip=lambda reason: self.metrics.files_skipped.labels(reason=reason).inc(),
                               on_confirmed=lambda check: self.metrics.files_confirmed.labels(check=check).inc(),
                               quiet_s=settings.quiet_s)
        self.writer_check: WriterCheck | None = None

        def transfer_factory(retry: Any, progress: Callable[[int, int], None]) -> Transfer:
            return Transfer(self.store, self.root, keys, multipart_threshold=settings.multipart_threshold,
                            part_size=settings.part_size, retry=retry, on_multipart=self.journal.set_upload,
                            on_progress=progress)

        policy = RetryPolicy(settings.max_attempts, settings.retry_base_s, settings.retry_cap_s)
        self.uploader = Uploader(self.journal, transfer_factory, workers=settings.workers, policy=policy,
                                 metrics=self.metrics, settle_s=settings.settle_s)
        self.scanner = Scanner(self.root, journal=self.journal, path_filter=self.filter, offer=self.settler.offer,
                               backlog=self.settler.__len__)
        self.watcher = Watcher(self.root, on_path=self._on_path, on_dir=self._on_dir, on_overflow=self._on_overflow)
        self.canary = Canary(self.root)
        self._watcher_log = RateLimitedLog(log, interval_s=60.0)  # a root that stays unusable retries every 2 s
        self._stop = threading.Event()
        self._scan_wanted = threading.Event()
        self._dirs_wanted: set[bytes] = set()
        self._pending_trigger = "startup"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.last_scan: dict[str, Any] = {}
        self.store_ok: bool | None = None
        self.store_problem = ""
        self._last_request_at = 0.0
        self._probe: threading.Thread | None = None
        self.http: Any = None

    # -- wiring callbacks ------------------------------------------------------------------------------

    def _on_request(self, operation: str, status: str) -> None:
        """Every HTTP attempt to the store: count it and judge the store by its answer (see ready())."""
        self.metrics.s3_requests.labels(operation=operation, status=status).inc()
        self._last_request_at = time.monotonic()
        reachable = status != "error" and not status.startswith("5")
        broken = status in BROKEN_STATUSES or (status == "404" and operation in BUCKET_OPERATIONS)
        self.store_ok = reachable and not broken
        self.store_problem = "" if self.store_ok else f"{operation} answered {status}"

    def _on_path(self, rel: bytes, source: str) -> None:
        if self.canary.matches(rel):
            self.canary.seen()
            return
        reason = self.filter.skip_reason(path_text(rel))
        if reason is None:
            self.settler.offer(rel, source)
        elif reason != "hidden" and source != "modify":  # one skip per file, not one per write(2)
            self.metrics.files_skipped.labels(reason=reason).inc()

    def _on_dir(self, rel: bytes) -> None:
        # A new or moved-in folder: files written before its watch existed get no events. Scan it.
        if self.filter.dir_skip_reason(path_text(rel)) is None:
            with self._lock:
                self._dirs_wanted.add(rel)
            self._scan_wanted.set()

    def _on_overflow(self) -> None:
        self.metrics.watcher_overflows.inc()
        log.warning("watcher_overflow", action="full_rescan")
        self.request_scan("overflow")

    def _on_ready(self, candidates: list[Candidate]) -> None:
        for c in self.journal.record(candidates):
            self.metrics.files_discovered.labels(source=EVENT_SOURCES.get(c.source, "event")).inc()
            log.debug("file_queued", path=path_text(c.path), bytes=c.size, source=c.source)
        self.uploader.wake()

    # -- scans and watchdog health -------------------------------------------------------------------

    def request_scan(self, trigger: str) -> None:
        """Ask the maintenance thread for a full reconciliation scan as soon as possible."""
        with self._lock:
            self._dirs_wanted.add(b"")
            self._pending_trigger = trigger
        self._scan_wanted.set()

    def scan(self, trigger: str, subdir: bytes = b"") -> None:
        """Reconcile (part of) the tree with the journal now, on the calling thread."""
        result = self.scanner.scan(subdir)
        if subdir:
            log.debug("folder_scanned", path=path_text(subdir), files=result.files, queued=result.offered)
            return
        self.metrics.rescans.labels(trigger=trigger).inc()
        self.metrics.scan_duration.observe(result.duration_s)
        self.last_scan = {"trigger": trigger, "files": result.files, "offered": result.offered,
                          "duration_s": round(result.duration_s, 3), "at": time.time()}
        log.info("scan_completed", trigger=trigger, files=result.files, offered=result.offered,
                 duration_s=round(result.duration_s, 3))

    def _maintenance(self) -> None:
        next_full = time.monotonic() + self.settings.scan_interval_s
        while not self._stop.is_set():
            self._scan_wanted.wait(timeout=min(CHECK_EVERY_S, max(0.0, next_full - time.monotonic())))
            self._scan_wanted.clear()
            if self._stop.is_set():
                return
            try:
                with self._lock:
                    dirs, self._dirs_wanted = self._dirs_wanted, set()
                    trigger = self._pending_trigger
                if time.monotonic() >= next_full:
                    dirs.add(b"")
                    trigger = "periodic"
                if b"" in dirs:
                    self.scan(trigger)
                    next_full = time.monotonic() + self.settings.scan_interval_s
                else:
                    for rel in sorted(dirs):
                        self.scan("folder", rel)
                self._check_watcher()
                self._check_watch_coverage()
                self._probe_store()
            except SidecarError:
                log.exception("maintenance_failed")
            except OSError as exc:
                log.error("maintenance_failed", error=str(exc))

    def _check_watcher(self) -> None:
        """Prove the watcher delivers events; rebuild it (and rescan) when it has gone deaf."""
        if self.watcher.mode == "none":
            return
        was_healthy = self.canary.healthy
        verdict = self.canary.check(self.watcher.is_alive(), grace_s=self._canary_grace())
        if verdict == "deaf":
            if was_healthy:
                log.warning("watcher_degraded", reason=self.canary.reason, mode=self.watcher.mode)
            self._restart_watcher(self.canary.reason)
        elif verdict == "ok":
            self._watcher_log.recovered("watcher_recovered", mode=self.watcher.mode)
        self.metrics.watcher_up.set(1 if self.canary.healthy else 0)

    def _check_watch_coverage(self) -> None:
        """A new folder the inotify watch limit skipped gets no events, silently (FIELD-NOTES §1): poll instead."""
        gap = self.watcher.coverage_gap()
        if gap is None:
            return
        self.watcher.degrade_to_polling(gap)
        log.warning("watcher_degraded", reason=self.watcher.degraded_reason, mode="polling", hint=LIMIT_HINT)
        self._restart_watcher("watch_limit")

    def _restart_watcher(self, reason: str) -> None:
        """Rebuild the observer, re-arm the canary and rescan; a root that cannot be watched stays deaf."""
        self.metrics.watcher_restarts.labels(reason=reason).inc()
        try:
            self.watcher.restart()
            self.canary.arm()  # after the new watch exists, or its event can never come back
        except OSError as exc:
            self._watcher_log.error("watcher_restart_failed", reason=reason, path=str(self.root),
                                    error=exc.strerror or str(exc))
            return
        finally:
            self._set_mode_metric()
        self._choose_writer_check()
        self.request_scan("watcher_restart")

    def _probe_store(self) -> None:
        """While the store is believed down and nothing else talks to it, one HeadBucket per PROBE_EVERY_S.

        At rest with a healthy store nothing is sent (no idle requests). The probe runs on its own thread
        so a hanging store cannot stall the watcher checks; its answer reaches store_ok via _on_request.
        """
        if self.store_ok is not False or time.monotonic() - self._last_request_at < PROBE_EVERY_S:
            return
        if self._probe is not None and self._probe.is_alive():
            return
        self._last_request_at = time.monotonic()  # also paces probes that never reach the wire
        self._probe = threading.Thread(target=self._probe_once, name="store-probe", daemon=True)
        self._probe.start()

    def _probe_once(self) -> None:
        # The uploader sets sidecar_store_reachable from its attempts; the probe speaks for the idle time.
        try:
            self.store.check()
        except StoreError as exc:
            self.metrics.store_reachable.set(0 if exc.transient else 1)
            log.debug("store_probe_failed", error=str(exc), error_class=exc.error_class)
            return
        self.metrics.store_reachable.set(1)
        log.info("store_probe_succeeded")

    def _choose_writer_check(self) -> None:
        """Probe which writer check holds here (sidecar.writercheck); log it once, and again if it changes."""
        found = choose([self.root, self.settings.state_dir], self.watcher.mode)
        if self.writer_check is None or found.mode != self.writer_check.mode:
            (log.info if found.mode != "quiet" else log.warning)("writer_check", **found.as_dict())
        self.writer_check = found
        self.settler.mode = found.mode
        for mode in MODES:
            self.metrics.writer_check.labels(mode=mode).set(1 if found.mode == mode else 0)

    def _canary_grace(self) -> float:
        return 3.0 if self.watcher.mode == "inotify" else 4 * 2.0

    def _set_mode_metric(self) -> None:
        for mode in ("inotify", "polling"):
            self.metrics.watcher_mode.labels(mode=mode).set(1 if self.watcher.mode == mode else 0)

    # -- what operators see -----------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: every loop thread runs and the watcher canary comes back."""
        threads = {t.name: t.is_alive() for t in self._threads}
        threads.update(uploader=self.uploader.alive())
        watching = self.watcher.mode != "none"
        alive, intact = self.watcher.is_alive(), self.canary.root_intact()
        watcher_ok = not watching or (alive and intact and self.canary.healthy)
        ok = all(threads.values()) and watcher_ok
        watcher = {"mode": self.watcher.mode, "alive": alive, "root_intact": intact, "canary": self.canary.verdict}
        if watching and not watcher_ok:
            watcher["reason"] = self.canary.reason or ("root_replaced" if not intact else "thread_stopped")
        return ok, {"threads": threads, "watcher": watcher}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: journal answers, watcher healthy, the store answered at the last attempt."""
        try:
            self.journal.next_due_in()
            journal_ok = True
        except SidecarError:
            journal_ok = False
        live, _ = self.health()
        store_ok = self.store_ok is not False
        details: dict[str, Any] = {"journal": journal_ok, "watcher": live, "store": store_ok}
        if not store_ok:
            details["store_problem"] = self.store_problem
        return journal_ok and live and store_ok, details

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for humans and scripts. Secrets are redacted."""
        stats = self.journal.stats()
        failures = [
            {"path": path_text(r.path), "error": r.last_error, "attempts": r.attempts}
            for r in self.journal.rows(FAILED, limit=10)
        ]
        return {
            "version": __version__,
            "counts": {state: {"files": n, "bytes": b} for state, (n, b) in stats.items()},
            "oldest_pending_age_s": round(self.journal.oldest_pending_age(), 3),
            "recent_failures": failures,
            "last_uploaded_key": self.uploader.last_key,
            "inflight": self.uploader.inflight(),
            "settling": len(self.settler),
            "watcher": {"mode": self.watcher.mode, "canary": self.canary.verdict,
                        "degraded_reason": self.watcher.degraded_reason},
            "writer_check": self.writer_check.as_dict() if self.writer_check else None,
            "store": {"endpoint": self.store.endpoint, "bucket": self.settings.bucket, "reachable": self.store_ok,
                      "problem": self.store_problem},
            "last_scan": self.last_scan,
            "config": self.settings.redacted(),
        }

    # -- lifecycle --------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Undo what a crash left behind: rows mid-upload go back to pending; open multipart uploads are aborted."""
        reset = self.journal.reset_inflight()
        for row_id, key, upload_id in self.journal.orphaned_multipart():
            try:
                self.store.abort_multipart(key, upload_id)
                self.journal.set_upload(row_id, None, None)
                log.info("multipart_orphan_aborted", key=key)
            except StoreError as exc:
                log.warning("multipart_orphan_abort_failed", key=key, error=str(exc))
        if reset:
            log.info("journal_recovered", requeued=reset)

    def start(self, *, watch: bool = True) -> None:
        """Start every part; a busy HTTP port or a broken journal fails here, loudly."""
        log.info("daemon_starting", version=__version__, watch_dir=str(self.root), bucket=self.settings.bucket,
                 endpoint=self.store.endpoint, pid=os.getpid())
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a path under a file, or no permission: a configuration problem, said once
            raise ConfigError(f"SIDECAR_WATCH_DIR: {self.root} is not a usable folder ({exc.strerror})") from None
        self.recover()
        if self.http is not None:
            self.http.start()
        self.uploader.start()
        self._spawn("settle", lambda: self.settler.run(self._stop))
        if watch:
            self.watcher.start()
            self._set_mode_metric()
            self.metrics.watcher_up.set(1)
            self.canary.arm()
        self._choose_writer_check()
        self.request_scan("startup")
        self._spawn("maintenance", self._maintenance)
        log.info("daemon_started", watcher_mode=self.watcher.mode, workers=self.settings.workers)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, deadline: float) -> bool:
        """Stop everything by ``deadline`` (a monotonic time). True if no upload was cut short."""
        log.info("shutdown_started", inflight=self.uploader.inflight())
        self._stop.set()
        self._scan_wanted.set()
        self.watcher.stop()
        drained = self.uploader.stop(max(0.0, deadline - time.monotonic()))
        if not drained:  # uploads cut by the deadline go back to pending now, not only at the next start
            try:
                self.journal.reset_inflight()
            except SidecarError as exc:  # the next start does it anyway
                log.warning("journal_requeue_failed", error=str(exc))
        if self.http is not None:
            self.http.stop(timeout_s=0.5)
        stats = self.journal.stats()
        log.info("shutdown_completed", drained=drained, pending=stats[PENDING][0] + stats["uploading"][0],
                 uploaded=stats[UPLOADED][0], failed=stats[FAILED][0])
        return drained

    def close(self) -> None:
        self.canary.close()
        self.journal.close()
