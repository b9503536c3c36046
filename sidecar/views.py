"""What operators see: ``/healthz`` (liveness), ``/readyz`` (readiness) and ``/status`` (a summary).

Read-only views over the parts the composition root built; nothing here changes state, except the
readiness check's one small journal commit, which is the proof that the journal still takes writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sidecar import __version__
from sidecar.errors import SidecarError
from sidecar.journal import FAILED, PENDING, SKIPPED, UPLOADING
from sidecar.keys import path_text

if TYPE_CHECKING:
    import threading

    from sidecar.config import Settings
    from sidecar.health import Canary
    from sidecar.jobs import Jobs
    from sidecar.journal import Journal
    from sidecar.maintenance import Maintenance
    from sidecar.retention import Retention
    from sidecar.settle import Settler
    from sidecar.store_health import StoreHealth
    from sidecar.uploader import Uploader
    from sidecar.watcher import Watcher


class Views:
    """health(), ready() and status() for the HTTP server and the CLI."""

    def __init__(
        self, *, settings: Settings, journal: Journal, uploader: Uploader, settler: Settler, watcher: Watcher,
        canary: Canary, maintenance: Maintenance, health: StoreHealth, endpoint: str,
        threads: Callable[[], list[threading.Thread]], retention: Retention | None = None, jobs: Jobs | None = None,
    ) -> None:
        self._jobs = jobs
        self._settings = settings
        self._journal, self._uploader, self._settler = journal, uploader, settler
        self._watcher, self._canary, self._maintenance = watcher, canary, maintenance
        self._health = health
        self._endpoint = endpoint
        self._threads = threads
        self._retention = retention

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: every loop thread runs and the watcher canary comes back."""
        threads = {t.name: t.is_alive() for t in self._threads()}
        threads.update(uploader=self._uploader.alive())
        watching = self._watcher.mode != "none"
        alive, intact = self._watcher.is_alive(), self._canary.root_intact()
        watcher_ok = not watching or (alive and intact and self._canary.healthy)
        ok = all(threads.values()) and watcher_ok
        watcher = {"mode": self._watcher.mode, "alive": alive, "root_intact": intact, "canary": self._canary.verdict}
        if watching and not watcher_ok:
            watcher["reason"] = self._canary.reason or ("root_replaced" if not intact else "thread_stopped")
        return ok, {"threads": threads, "watcher": watcher}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: the journal commits, the watcher is healthy, the store answers and is usable."""
        try:
            problem = self._journal.problem(commit=True)
        except SidecarError as exc:
            problem = str(exc)
        live, _ = self.health()
        store = self._health.snapshot()
        store_ok = store["state"] in ("up", "unknown")
        details: dict[str, Any] = {"journal": problem is None, "watcher": live, "store": store_ok}
        if problem is not None:
            details["journal_problem"] = problem
        if not store_ok:
            details["store_problem"] = store["problem"]
        return problem is None and live and store_ok, details

    def idle(self) -> dict[str, Any]:
        """``/idle``: nothing left to store -- no file pending, uploading or settling, no prompt still open."""
        stats = self._journal.stats()
        counts = self._journal.job_counts() if self._jobs is not None else {}
        busy = {"pending": stats[PENDING][0], "uploading": stats[UPLOADING][0], "settling": len(self._settler),
                "jobs_running": counts.get("running", 0), "jobs_uploading": counts.get("uploading", 0)}
        return {"idle": not any(busy.values()), **busy, "failed": stats[FAILED][0]}

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for humans and scripts. Secrets are redacted."""
        stats = self._journal.stats()

        def rows(state: str) -> list[dict[str, Any]]:
            return [{"path": path_text(r.path), "error": r.last_error, "error_class": r.error_class,
                     "attempts": r.attempts} for r in self._journal.rows(state, limit=10)]

        retrying = [{"path": path_text(r.path), "error": r.last_error, "error_class": r.error_class,
                     "attempts": r.attempts} for r in self._journal.rows("pending", limit=50) if r.last_error][:10]
        writer_check = self._maintenance.writer_check
        return {
            "version": __version__,
            "counts": {state: {"files": n, "bytes": b} for state, (n, b) in stats.items()},
            "oldest_pending_age_s": round(self._journal.oldest_pending_age(), 3),
            "recent_failures": rows(FAILED),
            "recent_skipped": rows(SKIPPED),
            "retrying": retrying,
            "multipart_orphans": len(self._journal.orphans()),
            "last_uploaded_key": self._uploader.last_key,
            "inflight": self._uploader.inflight(),
            "settling": len(self._settler),
            "watcher": {"mode": self._watcher.mode, "canary": self._canary.verdict,
                        "degraded_reason": self._watcher.degraded_reason},
            "writer_check": writer_check.as_dict() if writer_check else None,
            "journal": {"path": str(self._journal.path), "problem": self._maintenance.journal_problem},
            "store": {"endpoint": self._endpoint, "bucket": self._settings.bucket, **self._health.snapshot()},
            "last_scan": self._maintenance.last_scan,
            "retention": self._retention.snapshot() if self._retention is not None else {"enabled": False},
            "jobs": self._jobs.status() if self._jobs is not None else {"enabled": False},
            "config": self._settings.redacted(),
        }
