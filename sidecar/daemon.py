"""The composition root: builds every part, wires them together, and owns the lifecycle.

The path of one file, in one direction::

    Watcher / Scanner ─▶ Intake ─▶ Settler ─▶ Intake.on_ready ─▶ Journal ─▶ Uploader ─▶ Transfer ─▶ S3Store
                                                                                 ▲                     │
                                                     StoreHealth ◀── every request's answer ──────────┘

Beside it: Maintenance (scans, watcher repair, journal checks, orphan aborts), StoreProbe (while the store
is unhealthy), Views (health, ready, status). Start order: lock → journal → store → HTTP → uploader →
settler → watcher → maintenance and probe. Stop in reverse; in-flight uploads get the drain budget, the
rest stays pending in the journal.
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
from sidecar.addresses import is_loopback
from sidecar.backoff import RetryPolicy
from sidecar.comfyui import ComfyClient
from sidecar.comfyui_ws import StatusSocket
from sidecar.config import Settings
from sidecar.direct_put import direct_put_for
from sidecar.errors import ConfigError, SidecarError, StoreError
from sidecar.filters import PathFilter
from sidecar.folders import check_folders
from sidecar.health import Canary
from sidecar.intake import Intake
from sidecar.jobs import Jobs
from sidecar.jobs_http import JobsApi
from sidecar.journal import FAILED, PENDING, UPLOADED, open_journal
from sidecar.keys import path_text
from sidecar.maintenance import Maintenance
from sidecar.metrics import STORE_STATES, DiskCollector, JournalCollector, Metrics
from sidecar.metrics_jobs import JobCollector, JobMetrics
from sidecar.parts import PartBudget
from sidecar.retention import Retention, disk_usage
from sidecar.routing import Router
from sidecar.scanner import Scanner
from sidecar.settle import Settler
from sidecar.statelock import StateLock
from sidecar.store_health import StoreHealth, StoreProbe
from sidecar.store_s3 import S3Store, make_clients
from sidecar.transfer import Transfer
from sidecar.uploader import Uploader
from sidecar.urls import Urls
from sidecar.views import Views
from sidecar.waits import MAX_WAITERS, Waits
from sidecar.watcher import Watcher
from sidecar.webhooks import Webhooks

log = structlog.get_logger("sidecar.daemon")

PROBE_TIMEOUT_S = 5.0


class Daemon:
    """One sidecar: watches ``settings.watch_dir`` and uploads into ``settings.bucket``."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None, lock: bool = True) -> None:
        settings.require_bucket()
        check_folders(settings)  # before the lock and the journal create anything
        self.settings = settings
        self.root = settings.watch_dir
        self.lock = StateLock(settings.state_dir)
        if lock:
            self.lock.acquire()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.journal, moved = open_journal(settings.journal_path)
        if moved is not None:
            self.metrics.journal_problems.labels(problem="rebuilt").inc()
            log.error("journal_rebuilt", moved_to=str(moved), action="rescanning the tree; stored files are "
                      "recognised by a 412 and a HEAD, not uploaded again")
        self.registry.register(JournalCollector(self.journal.stats, self.journal.oldest_pending_age))
        self.registry.register(DiskCollector(lambda: disk_usage(self.root)))
        self.retention = (Retention(settings, journal=self.journal, metrics=self.metrics)
                          if settings.retention_on else None)
        self.fatal = threading.Event()
        self.fatal_reason = ""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.health = StoreHealth()
        self.health.on_change.append(self._on_store_change)
        secrets = [s.get_secret_value() for s in (settings.access_key_id, settings.secret_access_key) if s]
        direct, self.put_path_reason = direct_put_for(settings, observer=self._on_request, secrets=secrets)
        client, probe_client = make_clients(settings, probe_timeout_s=PROBE_TIMEOUT_S)
        self.store = S3Store(client, settings.bucket, secrets=secrets, observer=self._on_request, direct=direct)
        self.put_path = "botocore" if direct is None else "direct"
        probe_store = S3Store(probe_client, settings.bucket, secrets=secrets, observer=self._on_request)
        self.health.verify = probe_store.check
        self.probe = StoreProbe(self.health, probe_store.check, self._stop)
        self.router = Router.from_settings(settings)
        for warning in self.router.warnings():
            log.warning("key_routes_may_collide", problem=warning,
                        effect="the second file gets a content-hash variant key; nothing is overwritten")

        self.parts = PartBudget(buffers=settings.part_concurrency + 1, senders=settings.part_concurrency)

        def transfer_factory(retry: Any, progress: Callable[[int, int], None]) -> Transfer:
            return Transfer(self.store, self.root, self.router, multipart_threshold=settings.multipart_threshold,
                            part_size=settings.part_size, retry=retry, ledger=self.journal, budget=self.parts,
                            on_progress=progress, prompt_wait_s=settings.prompt_wait_s)

        policy = RetryPolicy(settings.max_attempts, settings.retry_base_s, settings.retry_cap_s)
        self.uploader = Uploader(self.journal, transfer_factory, workers=settings.workers, policy=policy,
                                 metrics=self.metrics, health=self.health, settle_s=settings.settle_s)
        self.settler = Settler(self.root, settle_s=settings.settle_s, on_ready=lambda c: self.intake.on_ready(c),  # noqa: PLW0108 - built below
                               on_skip=lambda reason: self.metrics.files_skipped.labels(reason=reason).inc(),
                               on_confirmed=lambda check: self.metrics.files_confirmed.labels(check=check).inc(),
                               quiet_s=settings.quiet_s)
        self.canary = Canary(self.root)
        path_filter = PathFilter(settings.extensions, settings.include, settings.exclude)
        self.waits = Waits(MAX_WAITERS)
        self.status_socket: StatusSocket | None = None
        self.jobs, self.webhooks = self._build_jobs(settings, path_filter)
        self.uploader.on_outcome = self._on_outcome
        self.intake = Intake(canary=self.canary, path_filter=path_filter, settler=self.settler, journal=self.journal,
                             metrics=self.metrics, wake=self._on_recorded,
                             want_dir=lambda rel: self.maintenance.want_dir(rel))  # noqa: PLW0108 - built below
        self.scanner = Scanner(self.root, journal=self.journal, path_filter=path_filter, offer=self.settler.offer,
                               backlog=self.settler.__len__, stop=self._stop)
        self.watcher = Watcher(self.root, on_path=self.intake.on_path, on_dir=self.intake.on_dir,
                               on_overflow=lambda: self.maintenance.on_overflow())  # noqa: PLW0108
        self.maintenance = Maintenance(
            root=self.root, state_dir=settings.state_dir, scan_interval_s=settings.scan_interval_s,
            scanner=self.scanner, watcher=self.watcher, canary=self.canary, settler=self.settler,
            journal=self.journal, store=self.store, health=self.health, metrics=self.metrics,
            on_journal_lost=self._journal_lost,
        )
        self.views = Views(settings=settings, journal=self.journal, uploader=self.uploader, settler=self.settler,
                           watcher=self.watcher, canary=self.canary, maintenance=self.maintenance,
                           health=self.health, endpoint=self.store.endpoint, threads=lambda: self._threads,
                           retention=self.retention, jobs=self.jobs)
        self.jobs_api = JobsApi(jobs=self.jobs, waits=self.waits, idle=self.views.idle, flush=self._flush)
        self.http: Any = None

    def _build_jobs(self, settings: Settings, path_filter: PathFilter) -> tuple[Jobs | None, Webhooks | None]:
        """Job tracking (sidecar.jobs) when SIDECAR_COMFYUI_URL is set, with its webhooks if configured."""
        if not settings.comfyui_url:
            return None, None
        metrics = JobMetrics(self.registry)
        urls = Urls(public_base_url=settings.public_base_url, presign=self.store.presign_get,
                    ttl_s=settings.presign_ttl_s)
        webhooks = None
        if settings.webhook_url and settings.webhook_secret is not None:
            webhooks = Webhooks(settings.webhook_url, settings.webhook_secret.get_secret_value(),
                                journal=self.journal, metrics=metrics, urls=urls)
            if "file" in settings.webhook_events:
                hooks = webhooks
                self.uploader.outcomes.on_stored = lambda row, result: hooks.file_stored(
                    path=path_text(row.path), key=result.key, size=result.size, md5=result.md5,
                    prompt_id=row.prompt_id)
        jobs = Jobs(client=ComfyClient(settings.comfyui_url), journal=self.journal, store=self.store, root=self.root,
                    path_filter=path_filter, urls=urls, pod_id=settings.pod_id,
                    manifest_template=settings.manifest_key, metrics=metrics, waits=self.waits,
                    wake_uploader=self.uploader.wake, wake_webhooks=webhooks.wake if webhooks else None,
                    poll_s=settings.comfyui_poll_s)
        self.registry.register(JobCollector(self.journal.job_counts, self.journal.webhook_backlog,
                                            lambda: jobs.watch.comfy_up))
        self.uploader.outcomes.on_held = metrics.held_for_prompt.inc
        if settings.comfyui_websocket:
            self.status_socket = StatusSocket(settings.comfyui_url, on_status=jobs.watch.on_status,
                                              on_connected=jobs.watch.on_websocket)
        return jobs, webhooks

    # -- wiring callbacks ------------------------------------------------------------------------------

    def _on_request(self, operation: str, status: str) -> None:
        """Every HTTP attempt to the store: count it; StoreHealth judges the store by its answer."""
        self.metrics.s3_requests.labels(operation=operation, status=status).inc()
        self.health.observe(operation, status)

    def _on_store_change(self, state: str) -> None:
        self.metrics.store_reachable.set(0 if state == "down" else 1)
        for name in STORE_STATES:
            self.metrics.store_state.labels(state=name).set(1 if name == state else 0)

    def _on_recorded(self) -> None:
        """New files are in the journal: upload them; a ComfyUI prompt is probably running."""
        self.uploader.wake()
        if self.jobs is not None:
            self.jobs.watch.poke()

    def _on_outcome(self) -> None:
        if self.jobs is not None:
            self.jobs.wake()
        self.waits.changed()

    def _flush(self) -> int:
        """Every pending file due now (``/idle?flush=1``, ``sidecar flush``)."""
        count = self.journal.due_now()
        self.uploader.wake()
        return count

    def _journal_lost(self, problem: str) -> None:
        """The journal file is gone or replaced: our writes no longer reach the file a restart reads. Restart
        (supervisord does), which rebuilds it from the tree without uploading stored files again."""
        self.fatal_reason = problem
        self.fatal.set()

    # -- lifecycle --------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Undo what a crash left behind: rows mid-upload go back to pending; open multipart uploads are aborted."""
        reset = self.journal.reset_inflight()
        self.journal.orphan_open_uploads()
        for key, upload_id in self.journal.orphans():
            try:
                self.store.abort_multipart(key, upload_id)
            except StoreError as exc:  # kept in the journal; maintenance tries again
                log.warning("multipart_orphan_abort_failed", key=key, error=str(exc))
                continue
            self.journal.drop_orphan(upload_id)
            log.info("multipart_orphan_aborted", key=key)
        if reset:
            log.info("journal_recovered", requeued=reset)

    def start(self, *, watch: bool = True) -> None:
        """Start every part; a busy HTTP port or a broken journal fails here, loudly."""
        log.info("daemon_starting", version=__version__, watch_dir=str(self.root), bucket=self.settings.bucket,
                 endpoint=self.store.endpoint, pid=os.getpid(),
                 journal_check=self.journal.integrity)
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
            self.maintenance.set_mode_metric()
            self.metrics.watcher_up.set(1)
            self.canary.arm()
        self.maintenance.choose_writer_check()
        self.maintenance.request_scan("startup")
        self._spawn("maintenance", lambda: self.maintenance.run(self._stop))
        self._spawn("store-probe", self.probe.run)
        if self.retention is not None:
            retention = self.retention
            self._spawn("retention", lambda: retention.run(self._stop))
        if self.jobs is not None:
            jobs = self.jobs
            self._spawn("jobs", lambda: jobs.run(self._stop))
        if self.status_socket is not None:
            status_socket = self.status_socket
            self._spawn("comfyui-websocket", lambda: status_socket.run(self._stop))
        if self.webhooks is not None:
            webhooks = self.webhooks
            self._spawn("webhooks", lambda: webhooks.run(self._stop))
        log.info("daemon_started", watcher_mode=self.watcher.mode, workers=self.settings.workers,
                 put_path=self.put_path, **({"put_path_reason": self.put_path_reason} if self.put_path_reason else {}))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, deadline: float) -> bool:
        """Stop everything by ``deadline`` (a monotonic time). True if no upload was cut short."""
        log.info("shutdown_started", inflight=self.uploader.inflight())
        self._stop.set()
        self.maintenance.wake()
        self.watcher.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.status_socket is not None:
            self.status_socket.stop()
        drained = self.uploader.stop(max(0.0, deadline - time.monotonic()))
        if not drained:  # uploads cut by the deadline go back to pending now, not only at the next start
            try:
                self.journal.reset_inflight()
            except SidecarError as exc:  # the next start does it anyway
                log.warning("journal_requeue_failed", error=str(exc))
        if self.http is not None:
            self.http.stop(timeout_s=0.5)
        try:
            stats = self.journal.stats()
            log.info("shutdown_completed", drained=drained, pending=stats[PENDING][0] + stats["uploading"][0],
                     uploaded=stats[UPLOADED][0], failed=stats[FAILED][0])
        except SidecarError as exc:
            log.warning("shutdown_completed", drained=drained, error=str(exc))
        return drained

    def close(self) -> None:
        self.canary.close()
        self.journal.close()
        self.lock.release()


def build_daemon(settings: Settings, *, registry: CollectorRegistry | None = None) -> Daemon:
    """The daemon of ``sidecar run`` (and the demo): every part, the HTTP server included."""
    from sidecar.http import HttpServer  # noqa: PLC0415 - keeps the import of `sidecar config` light

    daemon = Daemon(settings, registry=registry)
    token = settings.http_token.get_secret_value() if settings.http_token else None
    if token is None and not is_loopback(settings.http_host):
        log.warning("http_public_without_token", host=settings.http_host, port=settings.http_port,
                    hint="SIDECAR_HTTP_PUBLIC_WITHOUT_TOKEN=true: /status and /metrics are open to anyone who "
                    "reaches this port")
    daemon.http = HttpServer(settings.http_host, settings.http_port, daemon.registry, token=token,
                             health=daemon.views.health, ready=daemon.views.ready, status=daemon.views.status,
                             on_unauthorized=daemon.metrics.http_unauthorized.inc,
                             on_cut=daemon.metrics.http_cut.inc)
    daemon.http.routes.more_routes = daemon.jobs_api.handle
    return daemon
