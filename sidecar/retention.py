"""Retention: free the disk of files that are safely in the bucket, off the upload path, at a bounded rate.

Policies (all off by default): ``SIDECAR_DELETE_AFTER_S`` deletes a file that long after its verified
upload; ``SIDECAR_DISK_MIN_FREE`` (bytes or % of the watched filesystem) and ``SIDECAR_KEEP_MAX_BYTES`` (of
uploaded files still on disk) delete verified files oldest-uploaded first once exceeded, until 10 % past
the threshold (hysteresis). ``SIDECAR_RETENTION_INCLUDE``/``EXCLUDE`` globs limit what may be touched.
Every deletion goes through :func:`sidecar.safedelete.delete`, the one place a file is ever deleted.

A folder emptied by retention is removed once it has had no change for ``EMPTY_DIR_AGE_S``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import structlog

from sidecar import safedelete
from sidecar.config import Settings
from sidecar.errors import SidecarError, SourceFileError
from sidecar.journal import FileRow, Journal
from sidecar.localfile import open_parent
from sidecar.metrics import Metrics
from sidecar.sizes import floor_bytes, parse_bytes, parse_floor

log = structlog.get_logger(__name__)

EMPTY_DIR_AGE_S = 3600.0
PAGE = 200
LOUD_PER_PASS = 10  # this many retention_deleted lines per pass at INFO, the rest at DEBUG
INTERVAL_S = 1.0


@dataclass
class PassResult:
    deleted: dict[str, int] = field(default_factory=dict)  # reason -> files
    freed: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # safety reason -> files
    vanished: int = 0
    over: str = ""  # the policy still exceeded after the pass ("" when none)

    @property
    def count(self) -> int:
        return sum(self.deleted.values())


def disk_usage(root: Path) -> tuple[int, int]:
    """(free bytes for unprivileged users, total bytes) of the filesystem holding ``root``."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class Retention:
    """Runs passes of the policies over the journal's uploaded rows. One instance per daemon (or prune)."""

    def __init__(
        self, settings: Settings, *, journal: Journal, metrics: Metrics, dry_run: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = settings.watch_dir
        self._journal, self._metrics, self._clock = journal, metrics, clock
        self.delete_after_s = settings.delete_after_s
        self.min_free = parse_floor(settings.disk_min_free) if settings.disk_min_free else None
        self.keep_max = parse_bytes(settings.keep_max_bytes) if settings.keep_max_bytes else None
        self.include, self.exclude = tuple(settings.retention_include), tuple(settings.retention_exclude)
        self.dry_run = settings.retention_dry_run if dry_run is None else dry_run
        self.rate = settings.retention_rate
        self.quiet_s = settings.quiet_s
        self._tokens = self.rate
        self._refilled = time.monotonic()
        self._reported: set[int] = set()  # dry run: rows already logged
        self._emptied: dict[bytes, None] = {}
        self.last_pass: dict[str, Any] = {}
        self.totals: dict[str, int] = {}

    # -- what the policies ask for ---------------------------------------------------------------------

    def may_touch(self, rel: str) -> bool:
        if self.include and not any(fnmatchcase(rel, glob) for glob in self.include):
            return False
        return not any(fnmatchcase(rel, glob) for glob in self.exclude)

    def pressure(self) -> tuple[str, int]:
        """The policy that is exceeded and the bytes to free for it (with hysteresis); ("", 0) if none."""
        wants: list[tuple[int, str]] = []
        if self.min_free is not None:
            free, total = disk_usage(self.root)
            floor = floor_bytes(self.min_free, total)
            if free < floor:
                wants.append((floor + floor // 10 - free, "disk_free"))
        if self.keep_max is not None:
            kept = self._journal.kept_bytes()
            if kept > self.keep_max:
                wants.append((kept - (self.keep_max - self.keep_max // 10), "keep_max"))
        if not wants:
            return "", 0
        need, reason = max(wants)
        return reason, need

    # -- one pass ----------------------------------------------------------------------------------------

    def run_once(self, stop: threading.Event | None = None) -> PassResult:
        """Delete what the policies ask for, oldest upload first, at most ``rate`` files per second."""
        result = PassResult()
        reason, need = self.pressure()
        age_cutoff = None if self.delete_after_s is None else self._clock() - self.delete_after_s
        if need > 0:
            rows = self._uploaded(stop)
        elif age_cutoff is not None:  # only aged rows can go: the journal skips the rest (most passes find none)
            rows = self._uploaded(stop, before=age_cutoff)
        else:
            rows = iter(())
        for row, uploaded_at in rows:
            aged = age_cutoff is not None and uploaded_at <= age_cutoff
            if not aged and need <= 0:
                break  # rows come in upload order: nothing later is due either
            if not self.may_touch(os.fsdecode(row.path)) or (self.dry_run and row.id in self._reported):
                continue
            if not self._wait_token(stop):
                break
            need -= self._delete(row, "age" if aged else reason, result)
        self._rmdir_emptied()
        if self.dry_run or not (reason or result.count):  # nothing changed on disk: no need to look again
            result.over = reason if need > 0 else ""
        else:
            result.over = self.pressure()[0]
        self._summarise(result)
        return result

    def _uploaded(self, stop: threading.Event | None, before: float | None = None) -> Iterator[tuple[FileRow, float]]:
        """Every deletable row with its upload time, oldest first, a page at a time until ``stop``."""
        cursor = (0.0, 0)
        while not (stop is not None and stop.is_set()):
            page = self._journal.deletable(PAGE, after=cursor, before=before)
            if not page:
                return
            yield from page
            cursor = (page[-1][1], page[-1][0].id)

    def _delete(self, row: FileRow, why: str, result: PassResult) -> int:
        verdict = safedelete.delete(self.root, row, quiet_s=self.quiet_s, dry_run=self.dry_run)
        rel = os.fsdecode(row.path)
        if verdict.reason == "vanished":  # gone by other hands: the row says so, nothing was freed by us
            if not self.dry_run and self._journal.mark_deleted(row, reason="vanished"):
                result.vanished += 1
            return 0
        if not verdict.deleted:
            result.kept[verdict.reason] = result.kept.get(verdict.reason, 0) + 1
            self._metrics.retention_kept.labels(reason=verdict.reason).inc()
            log.debug("retention_kept", path=rel, reason=verdict.reason)
            return 0
        result.deleted[why] = result.deleted.get(why, 0) + 1
        result.freed += verdict.size
        loud = result.count <= LOUD_PER_PASS
        if self.dry_run:
            self._reported.add(row.id)
            (log.info if loud else log.debug)("retention_would_delete", path=rel, key=row.key, bytes=verdict.size,
                                              reason=why)
            return verdict.size
        if not self._journal.mark_deleted(row, reason=why):
            log.warning("retention_row_moved_on", path=rel)  # the file is gone; the next version is pending
        self._metrics.retention_deleted.labels(reason=why).inc()
        self._metrics.retention_deleted_bytes.labels(reason=why).inc(verdict.size)
        self.totals[why] = self.totals.get(why, 0) + 1
        (log.info if loud else log.debug)("retention_deleted", path=rel, key=row.key, bytes=verdict.size, reason=why)
        parent = row.path.rpartition(b"/")[0]
        if parent:
            self._emptied[parent] = None
        return verdict.size

    def _wait_token(self, stop: threading.Event | None) -> bool:
        """Take one deletion token (``rate`` per second, a burst of one second's worth); False if stopped."""
        while True:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            wait_s = (1 - self._tokens) / self.rate
            if stop is not None:
                if stop.wait(wait_s):
                    return False
            else:
                time.sleep(wait_s)

    def _rmdir_emptied(self) -> None:
        """Remove folders retention emptied once they are old and still empty (never the root)."""
        for rel in list(self._emptied):
            try:
                folder, name = open_parent(self.root, rel)
            except SourceFileError:
                del self._emptied[rel]
                continue
            try:
                if self._clock() - os.stat(name, dir_fd=folder, follow_symlinks=False).st_mtime < EMPTY_DIR_AGE_S:
                    continue
                os.rmdir(name, dir_fd=folder)
                log.info("retention_folder_removed", path=os.fsdecode(rel))
                parent = rel.rpartition(b"/")[0]
                if parent:
                    self._emptied[parent] = None
            except OSError:
                pass  # not empty (a new file arrived), or gone: leave it
            finally:
                os.close(folder)
            self._emptied.pop(rel, None)

    def _summarise(self, result: PassResult) -> None:
        if not (result.count or result.kept or result.vanished):
            return
        free, total = disk_usage(self.root)
        self.last_pass = {"at": self._clock(), "deleted": result.deleted, "freed_bytes": result.freed,
                          "kept": result.kept, "vanished": result.vanished, "free_bytes": free,
                          "total_bytes": total, "still_over": result.over or None, "dry_run": self.dry_run}
        log.info("retention_pass", **self.last_pass)

    # -- the thread ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        log.info("retention_started", **self.policies())
        while not stop.wait(INTERVAL_S):
            try:
                self.run_once(stop)
            except (SidecarError, OSError) as exc:  # the journal or the disk said no: try again next second
                log.warning("retention_pass_failed", error=str(exc))

    def policies(self) -> dict[str, Any]:
        return {"delete_after_s": self.delete_after_s, "disk_min_free": self.min_free and _shown(self.min_free),
                "keep_max_bytes": self.keep_max, "include": list(self.include), "exclude": list(self.exclude),
                "dry_run": self.dry_run, "rate_per_s": self.rate}

    def snapshot(self) -> dict[str, Any]:
        """What /status shows."""
        free, total = (0, 0)
        with contextlib.suppress(OSError):
            free, total = disk_usage(self.root)
        return {"enabled": True, **self.policies(), "free_bytes": free, "total_bytes": total,
                "kept_bytes": self._journal.kept_bytes(), "deleted_since_start": dict(self.totals),
                "last_pass": self.last_pass or None}


def _shown(floor: tuple[int | None, float | None]) -> str:
    size, fraction = floor
    return f"{size} bytes" if size is not None else f"{(fraction or 0) * 100:g}%"
