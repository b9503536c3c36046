"""``sidecar prune [--dry-run]``: one retention run with the daemon's rules, for a daemon that is not running.

Exit status: 0 when no policy is exceeded any more (or nothing was asked), 1 when one still is after every
safely deletable file went (the rest is not uploaded yet, changed, or excluded), 2 for configuration
problems or a running daemon (one line naming its PID; nothing is touched).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sidecar.config import Settings
from sidecar.errors import EXIT_FAILURE, EXIT_OK, ConfigError
from sidecar.journal import Journal
from sidecar.metrics import Metrics
from sidecar.retention import PassResult, Retention, disk_usage
from sidecar.statelock import StateLock

MAX_PASSES = 1000


def run_prune(settings: Settings, *, dry_run: bool) -> int:
    if not settings.retention_on:
        raise ConfigError("no retention policy is set: SIDECAR_DELETE_AFTER_S, SIDECAR_DISK_MIN_FREE or "
                          "SIDECAR_KEEP_MAX_BYTES (see README, Retention)")
    if not settings.journal_path.exists():
        raise ConfigError(f"SIDECAR_STATE_DIR: no journal at {settings.journal_path}; nothing is known to be "
                          "uploaded, so nothing may be deleted")
    lock = StateLock(settings.state_dir)
    lock.acquire()
    try:
        journal = Journal(settings.journal_path)
        try:
            retention = Retention(settings, journal=journal, metrics=Metrics(CollectorRegistry()),
                                  dry_run=dry_run or settings.retention_dry_run)
            total = PassResult()
            for _ in range(1 if retention.dry_run else MAX_PASSES):  # a dry pass already simulates the rest
                result = retention.run_once()
                _add(total, result)
                total.over = result.over
                if not result.count:
                    break
        finally:
            journal.close()
    finally:
        lock.release()
    free, size = disk_usage(settings.watch_dir)
    verb = "would delete" if retention.dry_run else "deleted"
    by_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(total.deleted.items())) or "-"
    kept = ", ".join(f"{reason}: {n}" for reason, n in sorted(total.kept.items())) or "-"
    print(f"{verb} {total.count} file(s), {total.freed} bytes ({by_reason}); kept by the safety rule: {kept}; "
          f"free {free} of {size} bytes")
    if total.over:
        print(f"still over the {total.over} policy: nothing more is safely deletable (not yet uploaded, "
              "changed since, being written, or excluded)")
        return EXIT_FAILURE
    return EXIT_OK


def _add(total: PassResult, result: PassResult) -> None:
    for reason, n in result.deleted.items():
        total.deleted[reason] = total.deleted.get(reason, 0) + n
    for reason, n in result.kept.items():
        total.kept[reason] = total.kept.get(reason, 0) + n
    total.freed += result.freed
    total.vanished += result.vanished
