"""The journal's vocabulary: its states, its schema migrations and the rows it hands out.

States of a file row::

    pending ──claim──▶ uploading ──▶ uploaded ──retention──▶ deleted   (the local copy removed, or gone)
       ▲                  │  ├─────▶ failed    (permanent error or attempts exhausted; ``requeue_failed``)
       └──── retry ◀──────┘  └─────▶ skipped   (vanished, not a regular file, outside the root)

A new file at the path of any row (a ``deleted`` one included) makes it ``pending`` again; its ``md5`` and
``key`` still describe the last upload, so new bytes under a reused name go to a variant key.

A *version* of a file is (size, mtime, inode, ctime): a same-size, same-mtime replacement renamed over a
file has another inode, and a rewrite that restores the mtime (``touch -d``) still moves the ctime.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PENDING = "pending"
UPLOADING = "uploading"
UPLOADED = "uploaded"
FAILED = "failed"
SKIPPED = "skipped"
DELETED = "deleted"
STATES = (PENDING, UPLOADING, UPLOADED, FAILED, SKIPPED, DELETED)

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
    """
    ALTER TABLE files ADD COLUMN ino INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE files ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0;
    -- multipart uploads whose abort failed: kept until an abort succeeds (their parts cost storage)
    CREATE TABLE orphans (upload_id TEXT PRIMARY KEY, key TEXT NOT NULL, noted_at REAL NOT NULL);
    -- small facts of the journal itself; 'ready_probe' is rewritten by every readiness check
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    -- retention: when and why the local copy of an uploaded file was deleted (sidecar.retention)
    ALTER TABLE files ADD COLUMN deleted_at REAL;
    ALTER TABLE files ADD COLUMN delete_reason TEXT;
    CREATE INDEX files_uploaded ON files (state, uploaded_at);
    """,
    """
    -- jobs: which ComfyUI prompt wrote a file (sidecar.jobs); NULL until ComfyUI lists it
    ALTER TABLE files ADD COLUMN prompt_id TEXT;
    ALTER TABLE files ADD COLUMN node_id TEXT;
    CREATE TABLE jobs (
        prompt_id       TEXT PRIMARY KEY,
        comfy_status    TEXT NOT NULL,             -- ComfyUI's: pending, in_progress, completed, failed; or lost
        state           TEXT NOT NULL,             -- ours: running, uploading, complete, failed
        create_time     REAL, start_time REAL, end_time REAL,   -- ComfyUI's times, epoch seconds
        error           TEXT,                      -- ComfyUI's error, or why the job failed here
        seen_at         REAL NOT NULL,             -- first heard of
        finished_at     REAL,                      -- when ComfyUI was first seen reporting it finished
        done_at         REAL,                      -- when it became complete or failed here
        manifest_key    TEXT, manifest_etag TEXT,
        document        TEXT,                      -- the job's final document (JSON), what the manifest holds
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error      TEXT
    );
    CREATE INDEX jobs_open ON jobs (state, next_attempt_at);
    CREATE INDEX jobs_seen ON jobs (seen_at);
    CREATE TABLE job_files (
        prompt_id TEXT NOT NULL, path BLOB NOT NULL, node_id TEXT NOT NULL, position INTEGER NOT NULL,
        cached    INTEGER NOT NULL DEFAULT 0,      -- listed by a node ComfyUI answered from its cache
        PRIMARY KEY (prompt_id, path)
    );
    CREATE INDEX job_files_path ON job_files (path);
    -- the webhook outbox (sidecar.webhooks): delivered at least once, across restarts
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY, prompt_id TEXT, body BLOB NOT NULL, created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,
        delivered_at REAL, last_error TEXT
    );
    CREATE INDEX webhooks_due ON webhooks (delivered_at, next_attempt_at);
    """,
)

Version = tuple[int, int, int, int]
"""(size, mtime_ns, inode, ctime_ns) of one version of a file."""


# SQL: the row still holds the version that was claimed (no newer one was recorded since); see claimed().
SAME_VERSION = "(size = :csize AND mtime_ns = :cmtime AND ino = :cino AND ctime_ns = :cctime)"


def claimed(version: Version) -> dict[str, int]:
    """The parameters of SAME_VERSION for ``version``."""
    size, mtime, ino, ctime = version
    return {"csize": size, "cmtime": mtime, "cino": ino, "cctime": ctime}


def version_of(st: os.stat_result) -> Version:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


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
    ino: int = 0
    ctime_ns: int = 0
    error_class: str | None = None
    prompt_id: str | None = None

    @property
    def version(self) -> Version:
        return (self.size, self.mtime_ns, self.ino, self.ctime_ns)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A finished file ready to be recorded: its relative path and the stat it was confirmed with."""

    path: bytes
    size: int
    mtime_ns: int
    source: str
    ino: int = 0
    ctime_ns: int = 0

    @property
    def version(self) -> Version:
        return (self.size, self.mtime_ns, self.ino, self.ctime_ns)


ROW_COLUMNS = (
    "id, path, size, mtime_ns, state, source, attempts, discovered_at, md5, key, etag, upload_id, last_error, "
    "ino, ctime_ns, error_class, prompt_id"
)


def row_of(r: Sequence[Any], state: str | None = None) -> FileRow:
    """A FileRow from a SELECT of ``ROW_COLUMNS``, optionally with the state just written."""
    return FileRow(
        id=int(r[0]), path=bytes(r[1]), size=int(r[2]), mtime_ns=int(r[3]), state=state or str(r[4]),
        source=str(r[5]), attempts=int(r[6]), discovered_at=float(r[7]), md5=r[8], key=r[9], etag=r[10],
        upload_id=r[11], last_error=r[12], ino=int(r[13]), ctime_ns=int(r[14]), error_class=r[15],
        prompt_id=r[16],
    )
