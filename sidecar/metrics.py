"""Prometheus metrics, all registered on one injected :class:`CollectorRegistry`.

Labels are few and bounded (``source``, ``outcome``, ``error_class``, ``operation``, ``status``); a path or
key is never a label. Queue gauges are not stored here: :class:`JournalCollector` reads them from the journal
at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.health import REASONS
from sidecar.safedelete import KEPT_REASONS

OUTCOMES = ("uploaded", "existing", "unchanged", "retry", "paused", "failed", "skipped")
STORE_STATES = ("up", "down", "broken", "unknown")
JOURNAL_PROBLEMS = ("rebuilt", "deleted", "replaced", "commit_failed")
# Canary verdicts (sidecar.health) plus the daemon's fallback to polling when the watch limit skipped a folder.
WATCHER_RESTART_REASONS = (*REASONS, "watch_limit", "mount_changed")
RETENTION_POLICIES = ("age", "disk_free", "keep_max")
SIZE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class Metrics:
    """Every metric the daemon exports. One instance per registry (one per test, one per process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # The standard process_*, python_info and python_gc_* families, as on the library's default registry.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.files_discovered = Counter(
            "sidecar_files_discovered_total", "Files found ready to upload, by how they were found.",
            ["source"], registry=registry,
        )
        self.files_skipped = Counter(
            "sidecar_files_skipped_total", "Candidate files not uploaded, by reason.",
            ["reason"], registry=registry,
        )
        self.uploads = Counter(
            "sidecar_uploads_total",
            "Finished upload attempts by outcome (uploaded, existing, unchanged, retry, paused, failed, skipped).",
            ["outcome"], registry=registry,
        )
        self.retries = Counter(
            "sidecar_upload_retries_total", "Upload attempts that failed and will be retried, by error class.",
            ["error_class"], registry=registry,
        )
        self.bytes_uploaded = Counter(
            "sidecar_uploaded_bytes_total", "Bytes committed to the bucket.", registry=registry,
        )
        self.upload_duration = Histogram(
            "sidecar_upload_duration_seconds", "Time spent on one successful upload (read, hash, PUT).",
            buckets=SIZE_BUCKETS, registry=registry,
        )
        self.e2e_latency = Histogram(
            "sidecar_end_to_end_latency_seconds",
            "Time from the file's last modification on disk to its object being committed.",
            buckets=SIZE_BUCKETS, registry=registry,
        )
        self.s3_requests = Counter(
            "sidecar_s3_requests_total", "Requests sent to the object store, by operation and HTTP status.",
            ["operation", "status"], registry=registry,
        )
        self.last_success = Gauge(
            "sidecar_last_upload_success_timestamp_seconds", "Unix time of the last successful upload.",
            registry=registry,
        )
        self.upload_progress = Gauge(
            "sidecar_upload_in_progress_bytes", "Bytes sent so far of multipart uploads in flight.",
            registry=registry,
        )
        self.watcher_up = Gauge(
            "sidecar_watcher_up", "1 when the filesystem watcher is proven to deliver events.", registry=registry,
        )
        self.watcher_mode = Gauge(
            "sidecar_watcher_mode", "1 for the active watcher mode (inotify or polling).", ["mode"],
            registry=registry,
        )
        self.watcher_restarts = Counter(
            "sidecar_watcher_restarts_total", "Watcher rebuild attempts after it was found deaf, by reason.",
            ["reason"], registry=registry,
        )
        self.watcher_overflows = Counter(
            "sidecar_watcher_overflows_total", "Kernel inotify queue overflows seen.", registry=registry,
        )
        self.rescans = Counter(
            "sidecar_rescans_total", "Full reconciliation scans, by trigger.", ["trigger"], registry=registry,
        )
        self.scan_duration = Histogram(
            "sidecar_scan_duration_seconds", "Duration of a full reconciliation scan.",
            buckets=SIZE_BUCKETS, registry=registry,
        )
        self.writer_check = Gauge(
            "sidecar_writer_check_mode", "1 for the writer check in force for files of other users "
            "(lease, events or quiet; see sidecar/writercheck.py).", ["mode"], registry=registry,
        )
        self.files_confirmed = Counter(
            "sidecar_files_confirmed_total", "Files confirmed finished, by the check that proved it "
            "(lease, close_event, quiet_period, close_timeout).", ["check"], registry=registry,
        )
        self.store_reachable = Gauge(
            "sidecar_store_reachable", "1 when the last request to the object store got an answer.",
            registry=registry,
        )
        self.store_state = Gauge(
            "sidecar_store_state", "1 for the object store's current state (up, down: no answer, broken: answers "
            "no retry will change, unknown: no request yet).", ["state"], registry=registry,
        )
        self.http_unauthorized = Counter(
            "sidecar_http_unauthorized_total", "Requests refused for a missing or wrong bearer token.",
            registry=registry,
        )
        self.retention_deleted = Counter(
            "sidecar_retention_deleted_total", "Local files deleted by retention after a verified upload, by policy.",
            ["reason"], registry=registry,
        )
        self.retention_deleted_bytes = Counter(
            "sidecar_retention_deleted_bytes_total", "Bytes of local files deleted by retention, by policy.",
            ["reason"], registry=registry,
        )
        self.retention_kept = Counter(
            "sidecar_retention_kept_total",
            "Files retention would have deleted but the safety rule kept (changed, writing, digest, ...).",
            ["reason"], registry=registry,
        )
        self.http_cut = Counter(
            "sidecar_http_connections_cut_total",
            "Client connections shut down for missing their deadline (a request head or an answer too slow).",
            registry=registry,
        )
        self.journal_problems = Counter(
            "sidecar_journal_problems_total", "Journal faults: rebuilt (a damaged file moved aside), deleted or "
            "replaced under the running daemon, commit_failed (readiness could not commit).", ["problem"],
            registry=registry,
        )
        Info("sidecar_build", "Build information.", registry=registry).info({"version": __version__})
        # Create the bounded label sets up front so increase() sees the first failure after a restart.
        for outcome in OUTCOMES:
            self.uploads.labels(outcome=outcome)
        for state in STORE_STATES:
            self.store_state.labels(state=state).set(1 if state == "unknown" else 0)
        for problem in JOURNAL_PROBLEMS:
            self.journal_problems.labels(problem=problem)
        for source in ("event", "scan"):
            self.files_discovered.labels(source=source)
        for reason in WATCHER_RESTART_REASONS:
            self.watcher_restarts.labels(reason=reason)
        for reason in RETENTION_POLICIES:
            self.retention_deleted.labels(reason=reason)
            self.retention_deleted_bytes.labels(reason=reason)
        for reason in KEPT_REASONS:
            if reason not in ("not_uploaded", "vanished"):  # never counted: not a policy's wish kept back
                self.retention_kept.labels(reason=reason)


QueueStats = dict[str, tuple[int, int]]


class JournalCollector(Collector):
    """Queue gauges read from the journal at scrape time: files and bytes per state, oldest pending age."""

    def __init__(self, stats: Callable[[], QueueStats], oldest_pending_age: Callable[[], float]) -> None:
        self._stats = stats
        self._oldest = oldest_pending_age

    def collect(self) -> Iterator[GaugeMetricFamily]:
        files = GaugeMetricFamily("sidecar_queue_files", "Files in the journal by state.", labels=["state"])
        size = GaugeMetricFamily("sidecar_queue_bytes", "Bytes in the journal by state.", labels=["state"])
        for state, (count, nbytes) in sorted(self._stats().items()):
            files.add_metric([state], count)
            size.add_metric([state], nbytes)
        yield files
        yield size
        yield GaugeMetricFamily(
            "sidecar_oldest_pending_age_seconds", "Age of the oldest file waiting to be uploaded (0 if none).",
            value=self._oldest(),
        )


class DiskCollector(Collector):
    """Free and total bytes of the filesystem holding the watched folder, read at scrape time."""

    def __init__(self, usage: Callable[[], tuple[int, int]]) -> None:
        self._usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            free, total = self._usage()
        except OSError:
            return
        yield GaugeMetricFamily("sidecar_disk_free_bytes", "Bytes free (for unprivileged users) on the "
                                "filesystem of the watched folder.", value=free)
        yield GaugeMetricFamily("sidecar_disk_total_bytes", "Size of the filesystem of the watched folder.",
                                value=total)
