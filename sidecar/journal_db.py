"""The journal's SQLite file and its faults: open, migrate, check, transactions, and the checks that prove
it still works while the daemon runs (:meth:`Database.problem`).

A damaged or empty file raises :class:`JournalCorrupt` (the caller moves it aside and rebuilds from the
tree: the conditional writes and a HEAD after each 412 find what is already stored); a read-only one, or a
folder we may not write, raises a one-line :class:`JournalError` naming the uid.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sidecar import cleanmark
from sidecar.errors import JournalError
from sidecar.journal_schema import MIGRATIONS

COMMIT_PROOF_EVERY_S = 5.0


class JournalCorrupt(JournalError):
    """The database file is damaged (or empty where a journal was); it can be moved aside and rebuilt."""


class Database:
    """One connection to the journal file, serialised by a lock."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._view_lock = threading.Lock()
        self._view_db: sqlite3.Connection | None = None  # the operator's reads (:meth:`_view`), opened on first use
        try:
            old_umask = os.umask(0o077)  # also for missing parents: mkdir(mode=) applies to the last one only
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._refuse_unusable()
                trusted = cleanmark.take(path)  # before connecting: the stat must be the closed file's
                self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            finally:
                os.umask(old_umask)
            self.identity = self._identity()
            self._proved_at = -COMMIT_PROOF_EVERY_S
            self._proof: str | None = None
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a process crash (kill -9); only a power cut may lose the newest rows,
            # and the startup scan finds those files again.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back after a checkpoint
            self._migrate()
            if not trusted:
                self._check_integrity()
            self.integrity = "unchanged since a clean close" if trusted else "checked"
        except sqlite3.DatabaseError as exc:
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise JournalError(f"journal {path} is read-only: {exc} (hint: the state folder and the journal "
                                   f"must be writable by uid {os.getuid()})") from None
            raise JournalCorrupt(f"journal {path} is damaged: {exc}") from None
        except OSError as exc:
            raise JournalError(f"cannot create journal {path}: {exc.strerror}") from None

    # -- plumbing ---------------------------------------------------------------------------------

    def _refuse_unusable(self) -> None:
        """A 0-byte file where a journal was would silently open as a new, empty journal; say so instead."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not os.access(self.path.parent, os.W_OK):
                raise JournalError(f"cannot create journal {self.path}: its folder is read-only for uid "
                                   f"{os.getuid()}") from None
            return
        if st.st_size == 0:
            raise JournalCorrupt(f"journal {self.path} is empty (0 bytes)")
        if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
            raise JournalError(f"journal {self.path} is read-only (hint: the state folder and the journal must be "
                               f"writable by uid {os.getuid()})")

    def _identity(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino)

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
        """Refuse a damaged journal at open (about 0.1 s per 100,000 files) rather than misbehave later;
        not run for a file unchanged since this daemon's clean close (:mod:`sidecar.cleanmark`).

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

    def _variable_limit(self) -> int:
        """How many ``?`` one statement may carry (999 in SQLite before 3.32, 32,766 or more after)."""
        with self._lock:
            return int(self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))

    def _read(self, sql: str, params: Sequence[object] | dict[str, object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal read failed: {exc}") from None

    def _view(self, sql: str, params: Sequence[object] | dict[str, object] = ()) -> list[tuple[object, ...]]:
        """A read for the operator's views (/metrics, /status) on a connection of its own, outside the writers'
        lock: WAL lets it read the last commit beside a writer, and sqlite3 lets other threads run while it
        steps, so a scrape that counts a million rows (~0.2 s) no longer holds up a record or a claim."""
        with self._view_lock:
            try:
                if self._view_db is None:
                    self._view_db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
                    self._view_db.execute("PRAGMA query_only=1")
                    self._view_db.execute("PRAGMA busy_timeout=5000")
                return self._view_db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal read failed: {exc}") from None

    def close(self) -> None:
        with self._view_lock:
            if self._view_db is not None:
                self._view_db.close()
        with self._lock:
            self._db.close()
            if self.problem() is None:  # still the file we opened: the next open may skip its check
                cleanmark.leave(self.path)

    def problem(self, *, commit: bool = False) -> str | None:
        """None while the journal is still the file we opened (and, with ``commit``, takes a write); else
        what is wrong. The commit proof is sent at most once per ``COMMIT_PROOF_EVERY_S``: readiness probes
        may come every second, and each commit is a page in the WAL on the pod's volume."""
        try:
            if self._identity() != self.identity:
                return f"journal {self.path} was replaced under the running daemon"
        except FileNotFoundError:
            return f"journal {self.path} was deleted under the running daemon"
        except OSError as exc:
            return f"journal {self.path} cannot be checked: {exc.strerror}"
        if not commit:
            return None
        now = time.monotonic()
        if now - self._proved_at < COMMIT_PROOF_EVERY_S:
            return self._proof
        try:
            with self._tx() as db:  # a commit, not a read: readiness must prove writes work
                db.execute("INSERT INTO meta (name, value) VALUES ('ready_probe', ?) "
                           "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (str(self._clock()),))
            self._proof = None
        except JournalError as exc:
            self._proof = str(exc)
        self._proved_at = now
        return self._proof

