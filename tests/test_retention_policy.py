"""Retention's policies on a real journal and real files (no daemon): order, hysteresis, globs, dry run,
the rate limit's accounting and the removal of emptied folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from support.uploaded import uploaded

from sidecar.cli import render_status
from sidecar.config import Settings
from sidecar.journal import DELETED, Journal
from sidecar.metrics import Metrics
from sidecar.retention import EMPTY_DIR_AGE_S, Retention


def make(root: Path, journal: Journal, clock: list[float] | None = None, **settings: object) -> Retention:
    values: dict[str, object] = {"quiet_s": 0.001, "retention_rate": 10_000, **settings}
    config = Settings(watch_dir=root, state_dir=root.parent / "state", **values)  # type: ignore[arg-type]
    now = clock if clock is not None else [time.time()]
    return Retention(config, journal=journal, metrics=Metrics(CollectorRegistry()), clock=lambda: now[0])


def present(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_keep_max_deletes_oldest_uploads_first_down_to_90_percent(journal: Journal, root: Path) -> None:
    for n in range(10):
        uploaded(journal, root, f"f{n}.png", b"x" * 1000)
    retention = make(root, journal, keep_max_bytes="5000")
    result = retention.run_once()
    # 10,000 bytes kept, limit 5,000: delete down to 4,500, i.e. the 6 oldest uploads.
    assert result.deleted == {"keep_max": 6} and result.freed == 6000
    assert present(root) == [f"f{n}.png" for n in range(6, 10)]
    assert journal.kept_bytes() == 4000
    assert retention.run_once().count == 0, "under the limit: the next pass deletes nothing (hysteresis)"


def test_delete_after_waits_for_the_age(journal: Journal, root: Path) -> None:
    uploaded(journal, root, "a.png", b"x" * 10)
    clock = [time.time()]
    retention = make(root, journal, clock, delete_after_s=3600)
    assert retention.run_once().count == 0
    clock[0] += 3601
    assert retention.run_once().deleted == {"age": 1}
    row = journal.get(b"a.png")
    assert row is not None and row.state == DELETED


def test_globs_limit_what_may_go(journal: Journal, root: Path) -> None:
    for rel in ("keep/a.png", "out/b.png", "out/c.mp4"):
        uploaded(journal, root, rel, b"x" * 10)
    make(root, journal, delete_after_s=0, retention_include=["out/*"], retention_exclude=["*.mp4"]).run_once()
    assert present(root) == ["keep/a.png", "out/c.mp4"]


def test_dry_run_reports_once_and_deletes_nothing(journal: Journal, root: Path) -> None:
    for n in range(3):
        uploaded(journal, root, f"f{n}.png", b"x" * 10)
    retention = make(root, journal, delete_after_s=0, retention_dry_run=True)
    assert retention.run_once().deleted == {"age": 3}
    assert retention.run_once().count == 0, "each file is reported once, not every second"
    assert present(root) == ["f0.png", "f1.png", "f2.png"]
    assert journal.kept_bytes() == 30


def test_a_file_removed_by_someone_else_is_marked_vanished(journal: Journal, root: Path) -> None:
    uploaded(journal, root, "a.png", b"x" * 10)
    (root / "a.png").unlink()
    result = make(root, journal, delete_after_s=0).run_once()
    assert (result.count, result.vanished) == (0, 1)
    assert journal.deleted_summary() == {"vanished": (1, 10)}


def test_an_emptied_folder_goes_only_once_it_is_old(journal: Journal, root: Path) -> None:
    uploaded(journal, root, "2026-12-01/a.png", b"x" * 10)
    clock = [time.time()]
    retention = make(root, journal, clock, delete_after_s=0)
    assert retention.run_once().count == 1
    assert (root / "2026-12-01").is_dir(), "just emptied: ComfyUI may be about to write into it"
    clock[0] += EMPTY_DIR_AGE_S + 1
    retention.run_once()
    assert not (root / "2026-12-01").exists()


def test_a_folder_that_got_a_new_file_stays(journal: Journal, root: Path) -> None:
    uploaded(journal, root, "day/a.png", b"x" * 10)
    clock = [time.time()]
    retention = make(root, journal, clock, delete_after_s=0)
    retention.run_once()
    (root / "day" / "b.png").write_bytes(b"new")
    os.utime(root / "day", (0, 0))  # old by its mtime, but not empty
    clock[0] += EMPTY_DIR_AGE_S + 1
    retention.run_once()
    assert present(root) == ["day/b.png"]


def test_the_rate_limit_spaces_deletions(journal: Journal, root: Path) -> None:
    """At 20 deletions/s, 30 deletions take at least half a second after the first second's burst."""
    for n in range(30):
        uploaded(journal, root, f"f{n:02d}.png", b"x")
    retention = make(root, journal, delete_after_s=0, retention_rate=20)
    started = time.monotonic()
    assert retention.run_once().count == 30
    assert time.monotonic() - started >= 0.45


def test_sidecar_status_shows_retention_when_enabled() -> None:
    shown = render_status({"version": "x", "counts": {}, "retention": {
        "enabled": True, "free_bytes": 10, "total_bytes": 100, "deleted_since_start": {"age": 3}, "dry_run": False}})
    assert "  retention: free 10 of 100 bytes, deleted since start {'age': 3}, dry run False" in shown.splitlines()
    assert "retention" not in render_status({"version": "x", "counts": {}, "retention": {"enabled": False}})
