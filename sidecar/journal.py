"""The durable journal: one SQLite database (WAL) that knows every file and owns every state transition.

States, schema and rows are in :mod:`sidecar.journal_schema`. A new or changed file (a new version:
size, mtime, inode or ctime) always goes back to ``pending``. The columns ``md5``, ``key`` and ``etag``
describe the last *successful* upload and survive a change, so the uploader can tell an unchanged
rewrite (no request) from new content under a reused name (a new key). An outcome written for a version
older than the one recorded since (the file changed during its upload) sends the row back to
``pending`` instead: a newer version is never parked untried. Every SQL statement of the project lives
in this module, in :mod:`sidecar.journal_retention` (uploaded → deleted) and in :mod:`sidecar.journal_jobs`.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sidecar.journal_db import JournalCorrupt
from sidecar.journal_jobs import JobLedger
from sidecar.journal_retention import RetentionLedger
from sidecar.journal_schema import (
    DELETED,
    FAILED,
    MIGRATIONS,
    PENDING,
    ROW_COLUMNS,
    SKIPPED,
    STATES,
    UPLOADED,
    UPLOADING,
    Candidate,
    FileRow,
    Version,
    row_of,
)
from sidecar.journal_schema import SAME_VERSION as _SAME
from sidecar.journal_schema import claimed as _claimed

__all__ = [
    "DELETED",
    "FAILED",
    "MIGRATIONS",
    "PENDING",
    "SKIPPED",
    "STATES",
    "UPLOADED",
    "UPLOADING",
    "Candidate",
    "FileRow",
    "Journal",
    "JournalCorrupt",
    "open_journal",
]

class Journal(JobLedger, RetentionLedger):
    """The file state machine on the journal database (jobs' and retention's tables in the bases). Thread-safe."""

    # -- discovery ----------------------------------------------------------------------------------

    def record(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        """Record finished files; new or changed ones become pending. Returns those that were queued.

        A changed file whose row is being uploaded keeps its claim (a second claim would upload it twice at
        once, and two multipart uploads of one key overwrite each other); its new version makes the outcome
        of the upload in flight queue it again.
        """
        now = self._clock()
        queued: list[Candidate] = []
        with self._tx() as db:
            for c in candidates:
                cur = db.execute(
                    """
                    INSERT INTO files (path, size, mtime_ns, ino, ctime_ns, state, source, discovered_at, updated_at)
                    VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)
                    ON CONFLICT (path) DO UPDATE SET
                        size = excluded.size, mtime_ns = excluded.mtime_ns, ino = excluded.ino,
                        ctime_ns = excluded.ctime_ns,
                        -- a row in flight stays claimed (no second worker); its outcome re-queues it
                        state = CASE files.state WHEN 'uploading' THEN 'uploading' ELSE 'pending' END,
                        source = excluded.source, attempts = 0, next_attempt_at = 0, last_error = NULL,
                        error_class = NULL, discovered_at = excluded.discovered_at, updated_at = excluded.updated_at,
                        deleted_at = NULL, delete_reason = NULL, prompt_id = NULL, node_id = NULL
                    WHERE files.size != excluded.size OR files.mtime_ns != excluded.mtime_ns
                        OR files.ino != excluded.ino OR files.ctime_ns != excluded.ctime_ns
                        OR files.state = 'skipped'
                    """,
                    (c.path, c.size, c.mtime_ns, c.ino, c.ctime_ns, c.source, now, now),
                )
                if cur.rowcount:
                    queued.append(c)
        return queued

    def changed(self, seen: Sequence[tuple[bytes, Version]]) -> list[bytes]:
        """The paths of ``seen`` (path, version on disk) that the journal does not know, knows with another
        version, or skipped: what a scan offers. Compared inside SQLite, so a tree of a million known files
        sends nothing back to Python."""
        out: list[bytes] = []
        step = max(1, self._variable_limit() // 5)
        for start in range(0, len(seen), step):
            chunk = seen[start : start + step]
            marks = ",".join("(?,?,?,?,?)" for _ in chunk)
            rows = self._read(
                f"""WITH seen(path, size, mtime_ns, ino, ctime_ns) AS (VALUES {marks})
                    SELECT seen.path FROM seen LEFT JOIN files f ON f.path = seen.path
                    WHERE f.id IS NULL OR f.state = 'skipped' OR f.size != seen.size
                       OR f.mtime_ns != seen.mtime_ns OR f.ino != seen.ino OR f.ctime_ns != seen.ctime_ns""",  # noqa: S608
                [value for path, version in chunk for value in (path, *version)],
            )
            out += [bytes(r[0]) for r in rows]  # type: ignore[call-overload]
        return out

    # -- the upload cycle -----------------------------------------------------------------------------

    def claim(self, limit: int) -> list[FileRow]:
        """Move up to ``limit`` due pending rows to uploading and return them, oldest due first."""
        with self._tx() as db:
            return _claim_due(db, limit, self._clock())

    def next_due_in(self) -> float | None:
        """Seconds until the next pending row is due (0 if one is due now), None if nothing is pending."""
        row = self._read("SELECT MIN(next_attempt_at) FROM files WHERE state = 'pending'")[0]
        if row[0] is None:
            return None
        return max(0.0, float(row[0]) - self._clock())  # type: ignore[arg-type]

    def mark_uploaded(self, row: FileRow, *, uploaded: Version, md5: str, key: str, etag: str,
                      then_claim: int = 0) -> list[FileRow]:
        """The content of version ``uploaded`` (read from the claimed ``row``) is in the bucket under ``key``.

        If a newer version was recorded while it was uploading, the row goes back to pending for it; the
        facts of this upload (md5, key, etag) are kept either way. ``then_claim``: in the same transaction,
        claim up to that many due rows (as :meth:`claim`) and return them: a worker takes its next file
        without a second commit or a hand-off.
        """
        size, mtime, ino, ctime = uploaded
        with self._tx() as db:
            db.execute(
                f"""UPDATE files SET
                       state = CASE WHEN {_SAME} THEN 'uploaded' ELSE 'pending' END,
                       next_attempt_at = CASE WHEN {_SAME} THEN next_attempt_at ELSE 0 END,
                       size = CASE WHEN {_SAME} THEN :size ELSE size END,
                       mtime_ns = CASE WHEN {_SAME} THEN :mtime ELSE mtime_ns END,
                       ino = CASE WHEN {_SAME} THEN :ino ELSE ino END,
                       ctime_ns = CASE WHEN {_SAME} THEN :ctime ELSE ctime_ns END,
                       md5 = :md5, key = :key, etag = :etag, uploaded_at = :now, updated_at = :now,
                       last_error = NULL, error_class = NULL, upload_id = NULL, upload_key = NULL
                   WHERE id = :id""",  # noqa: S608 - a constant fragment, no input
                {"size": size, "mtime": mtime, "ino": ino, "ctime": ctime, "md5": md5, "key": key, "etag": etag,
                 "now": self._clock(), "id": row.id, **_claimed(row.version)},
            )
            return _claim_due(db, then_claim, self._clock()) if then_claim else []

    def mark_retry(self, row: FileRow, *, error: str, error_class: str, delay_s: float, count: bool = True) -> None:
        """Back to pending, due again in ``delay_s`` (now, for a newer version); ``count`` adds an attempt."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                f"""UPDATE files SET state = 'pending',
                       attempts = CASE WHEN {_SAME} THEN attempts + :count ELSE 0 END,
                       next_attempt_at = CASE WHEN {_SAME} THEN :due ELSE 0 END,
                       last_error = :error, error_class = :class, updated_at = :now WHERE id = :id""",  # noqa: S608
                {"count": 1 if count else 0, "due": now + delay_s, "error": error, "class": error_class,
                 "now": now, "id": row.id, **_claimed(row.version)},
            )

    def mark_failed(self, row: FileRow, *, error: str, error_class: str) -> None:
        """Parked: needs an operator (``sidecar retry-failed``) or a change of the file.

        A newer version recorded during the attempt is not parked with it: it goes back to pending, due now.
        """
        self._end(row, FAILED, error=error, error_class=error_class, attempt=1)

    def mark_skipped(self, row: FileRow, *, reason: str) -> None:
        """Not uploadable as it stands (vanished, not a regular file); a later change re-queues it."""
        self._end(row, SKIPPED, error=reason, error_class=reason, attempt=0)

    def _end(self, row: FileRow, state: str, *, error: str, error_class: str, attempt: int) -> None:
        with self._tx() as db:
            db.execute(
                f"""UPDATE files SET state = CASE WHEN {_SAME} THEN :state ELSE 'pending' END,
                       attempts = CASE WHEN {_SAME} THEN attempts + :attempt ELSE 0 END,
                       next_attempt_at = CASE WHEN {_SAME} THEN next_attempt_at ELSE 0 END,
                       last_error = :error, error_class = :class, updated_at = :now WHERE id = :id""",  # noqa: S608
                {"state": state, "attempt": attempt, "error": error, "class": error_class, "now": self._clock(),
                 "id": row.id, **_claimed(row.version)},
            )

    def set_upload(self, row_id: int, key: str | None, upload_id: str | None) -> None:
        """Remember (or forget, with None) a multipart upload in flight so a crash can abort it at the next start."""
        with self._tx() as db:
            db.execute("UPDATE files SET upload_key = ?, upload_id = ? WHERE id = ?", (key, upload_id, row_id))

    # -- recovery and operations ------------------------------------------------------------------------

    def reset_inflight(self) -> int:
        """At start: rows a crash left uploading go back to pending, due now."""
        with self._tx() as db:
            return db.execute(
                "UPDATE files SET state = 'pending', next_attempt_at = 0 WHERE state = 'uploading'"
            ).rowcount

    def orphan_open_uploads(self) -> int:
        """At start: every multipart upload a crash left open becomes an orphan to abort."""
        now = self._clock()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO orphans (upload_id, key, noted_at) SELECT upload_id, upload_key, ? "
                       "FROM files WHERE upload_id IS NOT NULL", (now,))
            return db.execute("UPDATE files SET upload_id = NULL, upload_key = NULL "
                              "WHERE upload_id IS NOT NULL").rowcount

    def add_orphan(self, key: str, upload_id: str) -> None:
        """A multipart upload whose abort failed: kept until :meth:`drop_orphan` (an abort worked)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO orphans (upload_id, key, noted_at) VALUES (?, ?, ?)",
                       (upload_id, key, self._clock()))

    def orphans(self) -> list[tuple[str, str]]:
        """(key, upload id) of multipart uploads still to abort."""
        rows = self._read("SELECT key, upload_id FROM orphans ORDER BY noted_at")
        return [(str(r[0]), str(r[1])) for r in rows]

    def drop_orphan(self, upload_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM orphans WHERE upload_id = ?", (upload_id,))

    def due_now(self) -> int:
        """Every pending row due now (retry delays dropped): what ``sidecar scan`` promises."""
        with self._tx() as db:
            return db.execute("UPDATE files SET next_attempt_at = 0 WHERE state = 'pending'").rowcount

    def requeue_failed(self) -> int:
        """Every failed row back to pending with fresh attempts. Returns how many."""
        now = self._clock()
        with self._tx() as db:
            return db.execute(
                """UPDATE files SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ?
                   WHERE state = 'failed'""",
                (now,),
            ).rowcount

    # -- views ---------------------------------------------------------------------------------------

    def stats(self) -> dict[str, tuple[int, int]]:
        """(files, bytes) per state, every state present."""
        found = {
            str(r[0]): (int(r[1]), int(r[2] or 0))  # type: ignore[call-overload]
            for r in self._view("SELECT state, COUNT(*), SUM(size) FROM files GROUP BY state")
        }
        return {state: found.get(state, (0, 0)) for state in STATES}

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest pending or uploading file was discovered (0 if none)."""
        row = self._view("SELECT MIN(discovered_at) FROM files WHERE state IN ('pending', 'uploading')")[0]
        return 0.0 if row[0] is None else max(0.0, self._clock() - float(row[0]))  # type: ignore[arg-type]

    def rows(self, state: str, limit: int = 20, *, error_class: str | None = None) -> list[FileRow]:
        """Most recently updated rows in ``state`` (with that ``error_class``, if given)."""
        where, params = "state = :state", {"state": state, "limit": limit, "class": error_class}
        if error_class is not None:
            where += " AND error_class = :class"
        rows = self._view(
            f"SELECT {ROW_COLUMNS} FROM files WHERE {where} ORDER BY updated_at DESC LIMIT :limit",  # noqa: S608
            params,
        )
        return [row_of(r) for r in rows]

    def get(self, path: bytes) -> FileRow | None:
        """The row of one path, if any."""
        rows = self._read(f"SELECT {ROW_COLUMNS} FROM files WHERE path = ?", (path,))  # noqa: S608
        return row_of(rows[0]) if rows else None


def _claim_due(db: sqlite3.Connection, limit: int, now: float) -> list[FileRow]:
    """Inside a write transaction: move up to ``limit`` due pending rows to uploading, oldest due first."""
    rows = db.execute(
        f"SELECT {ROW_COLUMNS} FROM files WHERE state = 'pending' AND next_attempt_at <= ? "  # noqa: S608
        "ORDER BY next_attempt_at, id LIMIT ?",
        (now, limit),
    ).fetchall()
    db.executemany("UPDATE files SET state = 'uploading', updated_at = ? WHERE id = ?", [(now, r[0]) for r in rows])
    return [row_of(r, state=UPLOADING) for r in rows]


def open_journal(path: Path, *, clock: Callable[[], float] = time.time) -> tuple[Journal, Path | None]:
    """Open the journal; a damaged or empty one is moved aside (``<name>.corrupt-<UTC time>``, with its WAL)
    and a new one is started. Returns the journal and where the damaged file went (None if it was fine)."""
    try:
        return Journal(path, clock=clock), None
    except JournalCorrupt:
        stamp = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = path.with_name(f"{path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{moved}{suffix}"))
        return Journal(path, clock=clock), moved
