"""The journal: state transitions, crash recovery, migrations and permissions, on real SQLite."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from sidecar.errors import JournalError
from sidecar.journal import MIGRATIONS, Candidate, Journal


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def journal(tmp_path: Path, clock: Clock) -> Journal:
    return Journal(tmp_path / "state" / "journal.sqlite3", clock=clock)


def cand(path: bytes, size: int = 10, mtime_ns: int = 1) -> Candidate:
    return Candidate(path=path, size=size, mtime_ns=mtime_ns, source="close")


def test_new_files_are_queued_once(journal: Journal) -> None:
    """Recording the same finished file twice queues it once."""
    assert journal.record([cand(b"a.png"), cand(b"b.png")]) == [cand(b"a.png"), cand(b"b.png")]
    assert journal.record([cand(b"a.png")]) == []
    assert journal.stats()["pending"] == (2, 20)


def test_claim_moves_rows_to_uploading_and_restart_returns_them(tmp_path: Path, journal: Journal) -> None:
    """Rows a crash leaves uploading go back to pending when the journal is reopened."""
    journal.record([cand(b"a.png"), cand(b"b.png")])
    rows = journal.claim(5)
    assert [r.path for r in rows] == [b"a.png", b"b.png"] and {r.state for r in rows} == {"uploading"}
    assert journal.claim(5) == []
    journal.close()
    reopened = Journal(tmp_path / "state" / "journal.sqlite3")
    assert reopened.reset_inflight() == 2
    assert reopened.stats()["pending"][0] == 2


def test_uploaded_then_changed_keeps_last_upload_facts(journal: Journal) -> None:
    """A changed file is pending again but remembers the key and MD5 of its last upload."""
    journal.record([cand(b"a.png")])
    row = journal.claim(1)[0]
    journal.mark_uploaded(row.id, size=10, mtime_ns=1, md5="m1", key="k/a.png", etag="m1")
    assert journal.record([cand(b"a.png")]) == []  # unchanged stat: nothing to do
    journal.record([cand(b"a.png", size=11, mtime_ns=2)])
    again = journal.claim(1)[0]
    assert (again.md5, again.key, again.etag, again.size) == ("m1", "k/a.png", "m1", 11)


def test_retry_waits_for_its_time_and_counts_attempts(journal: Journal, clock: Clock) -> None:
    """A retried row is not claimable before next_attempt_at and carries its attempt count and error."""
    journal.record([cand(b"a.png")])
    row = journal.claim(1)[0]
    journal.mark_retry(row.id, error="boom", error_class="InternalError", delay_s=30)
    assert journal.claim(1) == []
    assert journal.next_due_in() == pytest.approx(30)
    clock.now += 30
    again = journal.claim(1)[0]
    assert again.attempts == 1 and again.last_error == "boom"


def test_failed_rows_are_parked_until_requeued(journal: Journal) -> None:
    """A failed row stays failed, even when rescanned unchanged, until requeue_failed."""
    journal.record([cand(b"a.png")])
    journal.mark_failed(journal.claim(1)[0].id, error="AccessDenied", error_class="AccessDenied")
    assert journal.record([cand(b"a.png")]) == []
    assert journal.stats()["failed"][0] == 1
    assert journal.rows("failed")[0].last_error == "AccessDenied"
    assert journal.requeue_failed() == 1
    assert journal.claim(1)[0].attempts == 0


def test_skipped_rows_come_back_when_seen_again(journal: Journal) -> None:
    """A file skipped as vanished is queued again when it reappears."""
    journal.record([cand(b"a.png")])
    journal.mark_skipped(journal.claim(1)[0].id, reason="vanished")
    assert journal.record([cand(b"a.png")]) == [cand(b"a.png")]


def test_oldest_pending_age_and_known(journal: Journal, clock: Clock) -> None:
    """The oldest pending age follows the clock; known() reports stat and state of given paths."""
    assert journal.oldest_pending_age() == 0
    journal.record([cand(b"a.png", size=5, mtime_ns=7)])
    clock.now += 12.5
    assert journal.oldest_pending_age() == pytest.approx(12.5)
    assert journal.known([b"a.png", b"zzz"]) == {b"a.png": (5, 7, "pending")}


def test_multipart_upload_is_remembered_until_done(journal: Journal) -> None:
    """An open multipart upload is listed as orphaned until the upload is marked done."""
    journal.record([cand(b"big.mp4")])
    row = journal.claim(1)[0]
    journal.set_upload(row.id, "k/big.mp4", "upload-1")
    assert journal.orphaned_multipart() == [(row.id, "k/big.mp4", "upload-1")]
    journal.mark_uploaded(row.id, size=10, mtime_ns=1, md5="m", key="k/big.mp4", etag="e-2")
    assert journal.orphaned_multipart() == []


def test_private_permissions_and_wal(tmp_path: Path, journal: Journal) -> None:
    """The state folder is 0700, the database 0600 and in WAL mode."""
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "journal.sqlite3").stat().st_mode) == 0o600
    db = sqlite3.connect(state / "journal.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_corrupt_journal_is_a_clear_error(tmp_path: Path) -> None:
    """A file that is not a database gives a JournalError that says what to do."""
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="move it aside"):
        Journal(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A journal written by a newer sidecar is not silently downgraded."""
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(JournalError, match="upgrade the sidecar"):
        Journal(path)


def test_non_utf8_paths_round_trip(journal: Journal) -> None:
    """Paths are stored as raw bytes, so names that are not UTF-8 survive exactly."""
    name = b"dir/\xff\xfe-\xe9.png"
    journal.record([cand(name)])
    assert journal.claim(1)[0].path == name
