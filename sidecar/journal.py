"""The durable journal: one SQLite database (WAL) that knows every file and owns every state transition.

States of a file row::

    pending ──claim──▶ uploading ──▶ uploaded
       ▲                  │  ├─────▶ failed    (permanent error or attempts exhausted; ``requeue_failed``)
       └──── retry ◀──────┘  └─────▶ skipped   (vanished, not a regular file, outside the root)

A new or changed file (by size and mtime) always goes back to ``pending``. The columns ``md5``, ``key``
and ``etag`` describe the last *successful* upload and survive a change, so the uploader can tell an
unchanged rewrite (no request) from new content under a reused name (a new key). Rows left ``uploading``
by a crash return to ``pending`` at open. Every SQL statement of the project lives in this module.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.errors import JournalError

PENDING = "pending"
UPLOADING = "uploading"
UPLOADED = "uploaded"
FAILED = "failed"
SKIPPED = "skipped"
STATES = (PENDING, UPLOADING, UPLOADED, FAILED, SKIPPED)

# Each entry migrates the schema from version N to N+1; PRAGMA user_version records how far we are.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE files (
        id              INTEGER PRIMARY KEY,
        path            BLOB    NOT NULL UNIQUE,   -- path relative to the watched root, raw bytes
        size            INTEGER NOT NULL,
        mtime_ns        INTEGER NOT NULL,
        state           TEXT    NOT NULL,
        source          TEXT    NOT NULL,          -- how it was found: close, create, move, scan
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL DEFAULT 0,
        last_error      TEXT,
        error_class     TEXT,
        md5             TEXT,                      -- hex MD5 of the content last uploaded
        key             TEXT,                      -- object key of the last upload
        etag            TEXT,
        uploaded_at     REAL,
        upload_id       TEXT,                      -- multipart upload in flight, aborted after a crash
        upload_key      TEXT,                      -- the key that multipart upload writes
        discovered_at   REAL    NOT NULL,
        updated_at      REAL    NOT NULL
    );
    CREATE INDEX files_due ON files (state, next_attempt_at);
    """,
)


@dataclass(frozen=True, slots=True)
class FileRow:
    """One journal row, as the uploader needs it."""

    id: int
    path: bytes
    size: int
    mtime_ns: int
    state: str
    source: str
    attempts: int
    discovered_at: float
    md5: str | None
    key: str | None
    etag: str | None
    upload_id: str | None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A finished file ready to be recorded: its relative path and the stat it was confirmed with."""

    path: bytes
    size: int
    mtime_ns: int
    source: str


def _row(r: Sequence[Any], state: str | None = None) -> FileRow:
    """A FileRow from a SELECT of ``_ROW_COLUMNS``, optionally with the state just written."""
    return FileRow(
        id=int(r[0]), path=bytes(r[1]), size=int(r[2]), mtime_ns=int(r[3]), state=state or str(r[4]),
        source=str(r[5]), attempts=int(r[6]), discovered_at=float(r[7]), md5=r[8], key=r[9], etag=r[10],
        upload_id=r[11], last_error=r[12],
    )


_ROW_COLUMNS = "id, path, size, mtime_ns, state, source, attempts, discovered_at, md5, key, etag, upload_id, last_error"


class Journal:
    """Thread-safe access to the journal database. One connection, serialised by a lock."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        try:
            old_umask = os.umask(0o077)  # also for missing parents: mkdir(mode=) applies to the last one only
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            finally:
                os.umask(old_umask)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a process crash (kill -9); only a power cut may lose the newest rows,
            # and the startup scan finds those files again.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
            self._check_integrity()
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"cannot open journal {path}: {exc} (hint: if it is corrupt, move it aside; "
                "the startup scan rebuilds it without re-uploading existing objects)"
            ) from None
        except OSError as exc:
            raise JournalError(f"cannot create journal {path}: {exc.strerror}") from None

    # -- plumbing ---------------------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise JournalError(
                f"journal {self.path} has schema version {version}, newer than this sidecar knows "
                f"({len(MIGRATIONS)}); upgrade the sidecar"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self._db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")

    def _check_integrity(self) -> None:
        """Refuse a damaged journal at open (about 0.1 s per 100,000 files) rather than misbehave later.

        Damage the header check misses (a torn index page, say) otherwise surfaces only when a query touches
        it: lookups by path can then miss known files or fail in a loop while the daemon looks alive.
        """
        problems = [str(r[0]) for r in self._db.execute("PRAGMA quick_check(3)").fetchall()]
        if problems != ["ok"]:
            detail = "; ".join(line for p in problems for line in p.splitlines() if not line.startswith("***"))
            raise sqlite3.DatabaseError(f"database is corrupt ({detail[:160]})")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise JournalError(f"journal write failed: {exc}") from None
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal read failed: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- discovery ----------------------------------------------------------------------------------

    def record(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        """Record finished files; new or changed ones become pending. Returns those that were queued.

        A changed file whose row is being uploaded keeps its claim (a second claim would upload it twice at
        once, and two multipart uploads of one key overwrite each other); its new size and mtime make
        :meth:`mark_uploaded` queue it again when the upload in flight ends.
        """
        now = self._clock()
        queued: list[Candidate] = []
        with self._tx() as db:
            for c in candidates:
                cur = db.execute(
                    """
                    INSERT INTO files (path, size, mtime_ns, state, source, discovered_at, updated_at)
                    VALUES (?, ?, ?, 'pending', ?, ?, ?)
                    ON CONFLICT (path) DO UPDATE SET
                        size = excluded.size, mtime_ns = excluded.mtime_ns,
                        -- a row in flight stays claimed (no second worker); its outcome re-queues it
                        state = CASE files.state WHEN 'uploading' THEN 'uploading' ELSE 'pending' END,
                        source = excluded.source, attempts = 0, next_attempt_at = 0, last_error = NULL,
                        error_class = NULL, discovered_at = excluded.discovered_at, updated_at = excluded.updated_at
                    WHERE files.size != excluded.size OR files.mtime_ns != excluded.mtime_ns
                        OR files.state = 'skipped'
                    """,
                    (c.path, c.size, c.mtime_ns, c.source, now, now),
                )
                if cur.rowcount:
                    queued.append(c)
        return queued

    def known(self, paths: Sequence[bytes]) -> dict[bytes, tuple[int, int, str]]:
        """(size, mtime_ns, state) of the given paths that the journal knows."""
        if not paths:
            return {}
        marks = ",".join("?" * len(paths))
        rows = self._read(f"SELECT path, size, mtime_ns, state FROM files WHERE path IN ({marks})", paths)  # noqa: S608
        return {bytes(r[0]): (int(r[1]), int(r[2]), str(r[3])) for r in rows}  # type: ignore[call-overload]

    # -- the upload cycle -----------------------------------------------------------------------------

    def claim(self, limit: int) -> list[FileRow]:
        """Move up to ``limit`` due pending rows to uploading and return them, oldest due first."""
        now = self._clock()
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM files WHERE state = 'pending' AND next_attempt_at <= ? "  # noqa: S608
                "ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE files SET state = 'uploading', updated_at = ? WHERE id = ?", [(now, r[0]) for r in rows]
            )
        return [_row(r, state=UPLOADING) for r in rows]

    def next_due_in(self) -> float | None:
        """Seconds until the next pending row is due (0 if one is due now), None if nothing is pending."""
        row = self._read("SELECT MIN(next_attempt_at) FROM files WHERE state = 'pending'")[0]
        if row[0] is None:
            return None
        return max(0.0, float(row[0]) - self._clock())  # type: ignore[arg-type]

    def mark_uploaded(
        self, row_id: int, *, size: int, mtime_ns: int, md5: str, key: str, etag: str,
        claimed: tuple[int, int] | None = None,
    ) -> None:
        """The content read with stat ``size``/``mtime_ns`` is in the bucket under ``key``.

        If the file was recorded again with another size or mtime while it was uploading (neither the one
        ``claimed`` nor the one uploaded), the row goes back to pending for that newer version instead; the
        facts of this upload (md5, key, etag) are kept either way.
        """
        now = self._clock()
        claimed_size, claimed_mtime = claimed if claimed is not None else (size, mtime_ns)
        with self._tx() as db:
            db.execute(
                """UPDATE files SET
                       state = CASE WHEN (size = :size AND mtime_ns = :mtime)
                                      OR (size = :csize AND mtime_ns = :cmtime) THEN 'uploaded' ELSE 'pending' END,
                       next_attempt_at = CASE WHEN (size = :size AND mtime_ns = :mtime)
                                      OR (size = :csize AND mtime_ns = :cmtime) THEN next_attempt_at ELSE 0 END,
                       size = CASE WHEN size = :csize AND mtime_ns = :cmtime THEN :size ELSE size END,
                       mtime_ns = CASE WHEN size = :csize AND mtime_ns = :cmtime THEN :mtime ELSE mtime_ns END,
                       md5 = :md5, key = :key, etag = :etag, uploaded_at = :now, updated_at = :now,
                       last_error = NULL, error_class = NULL, upload_id = NULL, upload_key = NULL
                   WHERE id = :id""",
                {"size": size, "mtime": mtime_ns, "csize": claimed_size, "cmtime": claimed_mtime, "md5": md5,
                 "key": key, "etag": etag, "now": now, "id": row_id},
            )

    def mark_retry(self, row_id: int, *, error: str, error_class: str, delay_s: float, count: bool = True) -> None:
        """Back to pending, due again in ``delay_s``; ``count`` adds one to the attempts."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                """UPDATE files SET state = 'pending', attempts = attempts + ?, next_attempt_at = ?,
                   last_error = ?, error_class = ?, updated_at = ? WHERE id = ?""",
                (1 if count else 0, now + delay_s, error, error_class, now, row_id),
            )

    def mark_failed(self, row_id: int, *, error: str, error_class: str) -> None:
        """Parked: needs an operator (``sidecar retry-failed``) or a change of the file."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                """UPDATE files SET state = 'failed', attempts = attempts + 1, last_error = ?, error_class = ?,
                   updated_at = ? WHERE id = ?""",
                (error, error_class, now, row_id),
            )

    def mark_skipped(self, row_id: int, *, reason: str) -> None:
        """Not uploadable as it stands (vanished, not a regular file); a later change re-queues it."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "UPDATE files SET state = 'skipped', last_error = ?, error_class = ?, updated_at = ? WHERE id = ?",
                (reason, reason, now, row_id),
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

    def orphaned_multipart(self) -> list[tuple[int, str, str]]:
        """(row id, key, upload id) of multipart uploads a crash left open."""
        rows = self._read("SELECT id, upload_key, upload_id FROM files WHERE upload_id IS NOT NULL")
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]  # type: ignore[call-overload]

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
            for r in self._read("SELECT state, COUNT(*), SUM(size) FROM files GROUP BY state")
        }
        return {state: found.get(state, (0, 0)) for state in STATES}

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest pending or uploading file was discovered (0 if none)."""
        row = self._read("SELECT MIN(discovered_at) FROM files WHERE state IN ('pending', 'uploading')")[0]
        return 0.0 if row[0] is None else max(0.0, self._clock() - float(row[0]))  # type: ignore[arg-type]

    def rows(self, state: str, limit: int = 20) -> list[FileRow]:
        """Most recently updated rows in ``state``."""
        rows = self._read(
            f"SELECT {_ROW_COLUMNS} FROM files WHERE state = ? ORDER BY updated_at DESC LIMIT ?",  # noqa: S608
            (state, limit),
        )
        return [_row(r) for r in rows]

    def get(self, path: bytes) -> FileRow | None:
        """The row of one path, if any."""
        rows = self._read(f"SELECT {_ROW_COLUMNS} FROM files WHERE path = ?", (path,))  # noqa: S608
        return _row(rows[0]) if rows else None
