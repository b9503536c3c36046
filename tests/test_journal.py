"""The journal: state transitions, crash recovery, migrations and permissions, on real SQLite."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.errors import JournalError
from sidecar.journal import MIGRATIONS, Candidate, FileRow, Journal, JournalCorrupt, open_journal


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


def cand(path: bytes, size: int = 10, mtime_ns: int = 1, ino: int = 5, ctime_ns: int = 1) -> Candidate:
    return Candidate(path=path, size=size, mtime_ns=mtime_ns, source="close", ino=ino, ctime_ns=ctime_ns)


def uploaded(journal: Journal, row: FileRow, md5: str = "m1", key: str = "k/a.png") -> None:
    journal.mark_uploaded(row, uploaded=row.version, md5=md5, key=key, etag=md5)


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
    uploaded(journal, row)
    assert journal.record([cand(b"a.png")]) == []  # unchanged stat: nothing to do
    journal.record([cand(b"a.png", size=11, mtime_ns=2)])
    again = journal.claim(1)[0]
    assert (again.md5, again.key, again.etag, again.size) == ("m1", "k/a.png", "m1", 11)


def test_retry_waits_for_its_time_and_counts_attempts(journal: Journal, clock: Clock) -> None:
    """A retried row is not claimable before next_attempt_at and carries its attempt count and error."""
    journal.record([cand(b"a.png")])
    row = journal.claim(1)[0]
    journal.mark_retry(row, error="boom", error_class="InternalError", delay_s=30)
    assert journal.claim(1) == []
    assert journal.next_due_in() == pytest.approx(30)
    clock.now += 30
    again = journal.claim(1)[0]
    assert again.attempts == 1 and again.last_error == "boom"


def test_failed_rows_are_parked_until_requeued(journal: Journal) -> None:
    """A failed row stays failed, even when rescanned unchanged, until requeue_failed."""
    journal.record([cand(b"a.png")])
    journal.mark_failed(journal.claim(1)[0], error="AccessDenied", error_class="AccessDenied")
    assert journal.record([cand(b"a.png")]) == []
    assert journal.stats()["failed"][0] == 1
    assert journal.rows("failed")[0].last_error == "AccessDenied"
    assert journal.requeue_failed() == 1
    assert journal.claim(1)[0].attempts == 0


def test_skipped_rows_come_back_when_seen_again(journal: Journal) -> None:
    """A file skipped as vanished is queued again when it reappears."""
    journal.record([cand(b"a.png")])
    journal.mark_skipped(journal.claim(1)[0], reason="vanished")
    assert journal.record([cand(b"a.png")]) == [cand(b"a.png")]


def test_oldest_pending_age_follows_the_clock(journal: Journal, clock: Clock) -> None:
    assert journal.oldest_pending_age() == 0
    journal.record([cand(b"a.png", size=5, mtime_ns=7)])
    clock.now += 12.5
    assert journal.oldest_pending_age() == pytest.approx(12.5)


@pytest.mark.parametrize("limit", [250_000, 12])  # 12 variables: chunks of 2 rows
def test_changed_names_what_a_scan_must_offer(journal: Journal, monkeypatch: pytest.MonkeyPatch,
                                              limit: int) -> None:
    """Unknown paths, any of the four version fields different, and skipped rows are changed; a path known
    with the same version (pending, uploading or uploaded) is not. Compared in SQLite, in chunks that fit
    its variable limit."""
    monkeypatch.setattr(journal, "_variable_limit", lambda: limit)
    for name in (b"same.png", b"size.png", b"mtime.png", b"ino.png", b"ctime.png", b"skip.png", b"up.png"):
        journal.record([cand(name, size=5, mtime_ns=7)])  # version (5, 7, 5, 1)
    rows = {r.path: r for r in journal.claim(10)}  # the others stay uploading
    journal.record([cand(b"pending.png", size=5, mtime_ns=7)])
    journal.mark_skipped(rows[b"skip.png"], reason="vanished")
    uploaded(journal, rows[b"up.png"])
    odd = "na\u00efve\udcff.png".encode("utf-8", "surrogateescape")
    seen = [(b"same.png", (5, 7, 5, 1)), (b"pending.png", (5, 7, 5, 1)), (b"size.png", (6, 7, 5, 1)),
            (b"mtime.png", (5, 8, 5, 1)), (b"ino.png", (5, 7, 6, 1)), (b"ctime.png", (5, 7, 5, 2)),
            (b"skip.png", (5, 7, 5, 1)), (b"up.png", (5, 7, 5, 1)), (b"new.png", (1, 1, 1, 1)), (odd, (1, 1, 1, 1))]
    assert sorted(journal.changed(seen)) == sorted(
        [b"size.png", b"mtime.png", b"ino.png", b"ctime.png", b"skip.png", b"new.png", odd])
    assert journal.changed([]) == []


def test_multipart_upload_left_open_becomes_an_orphan_kept_until_aborted(journal: Journal) -> None:
    """An upload a crash left open is an orphan at the next start; it stays listed until drop_orphan
    (an abort that worked), whatever happens to its row meanwhile."""
    journal.record([cand(b"big.mp4")])
    row = journal.claim(1)[0]
    journal.set_upload(row.id, "k/big.mp4", "upload-1")
    assert journal.orphan_open_uploads() == 1
    uploaded(journal, row, key="k/big.mp4")  # the row's next upload succeeds; the orphan is not forgotten
    journal.add_orphan("k/other.mp4", "upload-2")
    assert journal.orphans() == [("k/big.mp4", "upload-1"), ("k/other.mp4", "upload-2")]
    journal.drop_orphan("upload-1")
    assert journal.orphans() == [("k/other.mp4", "upload-2")]


def test_same_size_and_mtime_replacement_is_a_new_version(journal: Journal) -> None:
    """A file renamed over another with equal size and mtime (another inode), or rewritten with its mtime
    restored (another ctime), is queued again."""
    journal.record([cand(b"a.png")])
    uploaded(journal, journal.claim(1)[0])
    assert journal.record([cand(b"a.png", ino=6)]) == [cand(b"a.png", ino=6)]
    uploaded(journal, journal.claim(1)[0])
    assert journal.record([cand(b"a.png", ino=6, ctime_ns=2)]) == [cand(b"a.png", ino=6, ctime_ns=2)]


@pytest.mark.parametrize("outcome", ["failed", "skipped", "retry", "uploaded"])
def test_newer_version_recorded_during_an_attempt_is_never_parked_untried(journal: Journal, outcome: str) -> None:
    """Whatever the attempt on the old version ended in, the version recorded meanwhile is pending, due now,
    with fresh attempts."""
    journal.record([cand(b"a.png")])
    row = journal.claim(1)[0]
    journal.record([cand(b"a.png", size=11, mtime_ns=2)])  # the file changed while it uploaded
    if outcome == "failed":
        journal.mark_failed(row, error="x", error_class="AccessDenied")
    elif outcome == "skipped":
        journal.mark_skipped(row, reason="vanished")
    elif outcome == "retry":
        journal.mark_retry(row, error="x", error_class="SlowDown", delay_s=300)
    else:
        uploaded(journal, row)
    again = journal.claim(1)
    assert [(r.path, r.size, r.attempts) for r in again] == [(b"a.png", 11, 0)]


def test_outcome_of_the_claimed_version_is_kept(journal: Journal) -> None:
    """Without a newer version the outcome stands: failed is failed, with its class and message."""
    journal.record([cand(b"a.png")])
    journal.mark_failed(journal.claim(1)[0], error="denied", error_class="AccessDenied")
    (row,) = journal.rows("failed")
    assert (row.error_class, row.last_error, row.attempts) == ("AccessDenied", "denied", 1)


def test_private_permissions_and_wal(tmp_path: Path, journal: Journal) -> None:
    """The state folder is 0700, the database 0600 and in WAL mode."""
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "journal.sqlite3").stat().st_mode) == 0o600
    db = sqlite3.connect(state / "journal.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


@pytest.mark.parametrize("content", [b"this is not sqlite" * 100, b""], ids=["garbage", "empty"])
def test_damaged_or_empty_journal_is_moved_aside_and_rebuilt(tmp_path: Path, content: bytes) -> None:
    """Journal() refuses it (JournalCorrupt); open_journal() moves it aside with a timestamp, keeps its
    bytes for a post-mortem, and starts a new journal that works."""
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(content)
    with pytest.raises(JournalCorrupt):
        Journal(path)
    journal, moved = open_journal(path)
    assert moved is not None and moved.name.startswith("journal.sqlite3.corrupt-") and moved.read_bytes() == content
    assert journal.record([cand(b"a.png")]) == [cand(b"a.png")] and journal.problem(commit=True) is None


def _as_nobody(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child with uid/gid 65534 (a process that does not own the files); its result."""
    if os.getuid() != 0:
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, answer through the pipe, never return into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, fn().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        return f.read().decode()


def test_read_only_journal_is_one_clear_line() -> None:
    """A journal the daemon may not write (here: owned by another uid) is refused at open with one line
    naming the file and the uid -- not taken for damage, not moved aside."""
    tmp_path = Path(tempfile.mkdtemp(prefix="sidecar-ro-", dir="/tmp"))  # pytest's tmp_path is root-only
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    path.chmod(0o644)
    tmp_path.chmod(0o755)

    def attempt() -> str:
        try:
            open_journal(path)
        except JournalCorrupt as exc:
            return f"corrupt: {exc}"
        except JournalError as exc:
            return f"error: {exc}"
        return "opened"

    answer = _as_nobody(attempt)
    assert answer.startswith("error: ") and "read-only" in answer and "uid 65534" in answer, answer
    left = sorted(p.name for p in tmp_path.iterdir())
    shutil.rmtree(tmp_path)
    assert "\n" not in answer and [name for name in left if not name.endswith(".clean")] == ["journal.sqlite3"]


def test_deleted_or_replaced_journal_is_detected(tmp_path: Path) -> None:
    """problem() says None while all is well, and names a journal deleted or replaced under us."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    assert journal.problem(commit=True) is None
    path.rename(tmp_path / "elsewhere")
    assert "deleted" in (journal.problem() or "")
    path.write_bytes(b"")
    assert "replaced" in (journal.problem() or "")


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


def test_readiness_proves_the_journal_takes_writes(tmp_path: Path) -> None:
    """A journal that still reads but no longer commits (here: query_only, as a full or read-only disk
    behaves) is a problem for readiness; the cheap identity check alone does not write at all."""
    journal = Journal(tmp_path / "journal.sqlite3")
    wal = tmp_path / "journal.sqlite3-wal"
    size = wal.stat().st_size if wal.exists() else 0
    assert journal.problem() is None and (wal.stat().st_size if wal.exists() else 0) == size  # no write
    journal._db.execute("PRAGMA query_only=ON")
    problem = journal.problem(commit=True)
    assert problem is not None and "journal write failed" in problem
    assert journal.stats()["pending"] == (0, 0)  # reads still work: a read-only probe would have said "fine"


def test_a_long_view_read_does_not_hold_up_writers(journal: Journal) -> None:
    """While a /metrics or /status read of the journal is still counting (here a query that steps for seconds),
    files are recorded, claimed and marked uploaded, and stats() then sees those commits."""
    long_read = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000000) "
                 "SELECT COUNT(*) FROM c")
    reader = threading.Thread(target=journal._view, args=(long_read,), daemon=True)
    reader.start()
    journal.record([cand(b"a.png"), cand(b"b.png")])
    rows = journal.claim(2)
    for row in rows:
        uploaded(journal, row, key=f"k/{row.path.decode()}")
    assert reader.is_alive(), "the view read ended before the writes: it proves nothing"
    assert journal.stats()["uploaded"] == (2, 20)
    reader.join(timeout=60)


def test_a_cleanly_closed_journal_is_trusted_once_and_any_change_brings_the_check_back(tmp_path: Path) -> None:
    """The integrity check is skipped only for the file a clean close left (sidecar.cleanmark): a second
    open while the first is still open (what a crash leaves) checks, and so does one after the file changed."""
    path = tmp_path / "journal.sqlite3"
    first = Journal(path)
    assert first.integrity == "checked"
    first.record([cand(b"a.png")])
    first.close()
    again = Journal(path)
    assert again.integrity == "unchanged since a clean close"
    assert again.get(b"a.png") is not None
    crashed = Journal(path)  # the first open took the mark; this one finds none
    assert crashed.integrity == "checked"
    crashed.close()
    again.close()
    with path.open("r+b") as f:  # a write that keeps size and content: its ctime still moves
        f.seek(100)
        same = f.read(4)
        f.seek(100)
        f.write(same)
    reopened = Journal(path)
    assert reopened.integrity == "checked"
    reopened.close()


def test_index_pages_torn_right_after_a_clean_close_are_still_found(tmp_path: Path) -> None:
    """Damage written within milliseconds of the close (the same clock tick) does not ride on its mark."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record([cand(f"old/img_{i:05d}.png".encode()) for i in range(2000)])
    journal.close()
    mark = (tmp_path / "journal.sqlite3.clean").read_bytes()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    pages = [r[0] for r in db.execute("SELECT pageno FROM dbstat WHERE name = 'sqlite_autoindex_files_1' "
                                      "AND pagetype = 'leaf'")]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    (tmp_path / "journal.sqlite3.clean").write_bytes(mark)  # as if the reader above never happened
    with path.open("r+b") as f:
        for page in pages:
            f.seek((page - 1) * size)
            f.write(b"\xa5" * size)
    _, moved = open_journal(path)
    assert moved is not None and not (tmp_path / "journal.sqlite3.clean").exists()
