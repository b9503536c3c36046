"""The journal's side of jobs: what ComfyUI said about each prompt, which files it listed, the manifest, and
the webhook outbox. The decisions are :mod:`sidecar.jobs`'; this module only stores and answers.

A job's ``state`` (ours) goes ``running`` → ``uploading`` (ComfyUI reported it finished) → ``complete`` or
``failed`` (every listed file is stored or failed for good, and the manifest is written). A file belongs to
the first prompt that listed it while it was that prompt's work: a cached re-run lists the files of an earlier
prompt and never takes them over, and a new version of a file (a reused name) belongs to nobody until a
prompt lists it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sidecar.comfyui import JobReport
from sidecar.journal_db import Database

RUNNING, UPLOADING, COMPLETE, FAILED_JOB = "running", "uploading", "complete", "failed"
JOB_STATES = (RUNNING, UPLOADING, COMPLETE, FAILED_JOB)
MTIME_SLACK_S = 2.0  # a file of a prompt is not older than the prompt (same clock; ComfyUI rounds to ms)

_JOB_COLUMNS = ("prompt_id, comfy_status, state, create_time, start_time, end_time, error, seen_at, finished_at, "
                "done_at, manifest_key, manifest_etag, attempts, last_error")


@dataclass(frozen=True, slots=True)
class JobRow:
    prompt_id: str
    comfy_status: str
    state: str
    create_time: float | None
    start_time: float | None
    end_time: float | None
    error: str | None
    seen_at: float
    finished_at: float | None
    done_at: float | None
    manifest_key: str | None
    manifest_etag: str | None
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class JobFile:
    """A file a job listed, with its journal row where there is one of this job's version."""

    path: bytes
    node_id: str
    cached: bool
    state: str | None = None  # the files row's state; None: no row (yet), or only an older version
    size: int = 0
    md5: str | None = None
    key: str | None = None
    etag: str | None = None
    uploaded_at: float | None = None
    error: str | None = None


def _job(r: tuple[Any, ...]) -> JobRow:
    return JobRow(*r)


class JobLedger(Database):
    """Jobs, their files and the webhook outbox, on the journal database."""

    # -- what ComfyUI said ---------------------------------------------------------------------------

    def note_job(self, report: JobReport) -> bool:
        """Record a report; a finished one also records its files. True if the job is new or moved on."""
        now = self._clock()
        finished = report.finished
        with self._tx() as db:
            old = db.execute("SELECT comfy_status, finished_at FROM jobs WHERE prompt_id = ?",
                             (report.prompt_id,)).fetchone()
            if old is not None and (old[1] is not None or old[0] == report.status):
                return False  # finished reports never change; a running one only by its status
            db.execute(
                """INSERT INTO jobs (prompt_id, comfy_status, state, create_time, start_time, end_time, error,
                                     seen_at, finished_at)
                   VALUES (:id, :status, :state, :create, :start, :end, :error, :now, :finished)
                   ON CONFLICT (prompt_id) DO UPDATE SET comfy_status = excluded.comfy_status,
                       state = excluded.state, start_time = excluded.start_time, end_time = excluded.end_time,
                       error = excluded.error, finished_at = excluded.finished_at""",
                {"id": report.prompt_id, "status": report.status, "state": UPLOADING if finished else RUNNING,
                 "create": report.create_time, "start": report.start_time, "end": report.end_time,
                 "error": report.error or None, "now": now, "finished": now if finished else None},
            )
            if finished:
                db.executemany(
                    "INSERT OR IGNORE INTO job_files (prompt_id, path, node_id, position, cached) VALUES (?,?,?,?,?)",
                    [(report.prompt_id, out.relpath.encode("utf-8", "surrogateescape"), out.node_id, n,
                      int(out.node_id in report.cached_nodes)) for n, out in enumerate(report.outputs)],
                )
        return True

    def job_lost(self, prompt_id: str, reason: str) -> None:
        """ComfyUI no longer knows a job it reported running (it restarted): finished, with what it wrote."""
        now = self._clock()
        with self._tx() as db:
            db.execute("UPDATE jobs SET comfy_status = 'lost', state = :uploading, error = :reason, finished_at = :now "
                       "WHERE prompt_id = :id AND finished_at IS NULL",
                       {"uploading": UPLOADING, "reason": reason, "now": now, "id": prompt_id})

    def link_files(self, prompt_id: str) -> list[bytes]:
        """Give this job's not cached, not older files to it where no prompt has them; returns those paths.
        A read finds them first: most passes have nothing to link and take no write lock."""
        rows = self._read(
            """SELECT f.path FROM files f JOIN job_files j ON j.path = f.path AND j.prompt_id = :id
               JOIN jobs ON jobs.prompt_id = j.prompt_id
               WHERE j.cached = 0 AND f.prompt_id IS NULL
                 AND f.mtime_ns >= CAST((COALESCE(jobs.create_time, 0) - :slack) * 1e9 AS INTEGER)""",
            {"id": prompt_id, "slack": MTIME_SLACK_S})
        paths = [bytes(r[0]) for r in rows]  # type: ignore[call-overload]
        if not paths:
            return []
        with self._tx() as db:
            db.executemany(
                """UPDATE files SET prompt_id = :id,
                       node_id = (SELECT node_id FROM job_files WHERE prompt_id = :id AND path = :path),
                       next_attempt_at = CASE WHEN state = 'pending' AND error_class = 'awaiting_prompt'
                                              THEN 0 ELSE next_attempt_at END
                   WHERE path = :path AND prompt_id IS NULL""",
                [{"id": prompt_id, "path": p} for p in paths],
            )
        return paths

    # -- reading jobs --------------------------------------------------------------------------------

    def job(self, prompt_id: str) -> JobRow | None:
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE prompt_id = ?", (prompt_id,))  # noqa: S608
        return _job(rows[0]) if rows else None

    def jobs(self, *, limit: int, offset: int = 0, state: str | None = None) -> tuple[list[JobRow], int]:
        """Jobs newest first (by when they were first heard of), and how many there are in all."""
        params: dict[str, object] = {"state": state} if state else {}
        where = "WHERE state = :state" if state else ""
        total = self._read(f"SELECT COUNT(*) FROM jobs {where}", params)[0][0]  # noqa: S608
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY seen_at DESC, prompt_id "  # noqa: S608
                          "LIMIT :limit OFFSET :offset", {**params, "limit": limit, "offset": offset})
        return [_job(r) for r in rows], int(total)  # type: ignore[call-overload]

    def ids_in(self, state: str) -> list[str]:
        return [str(r[0]) for r in self._read("SELECT prompt_id FROM jobs WHERE state = ? ORDER BY seen_at",
                                              (state,))]

    def job_files(self, prompt_id: str) -> list[JobFile]:
        """The files a job listed, in ComfyUI's order, each with its row if the row holds this job's version."""
        rows = self._read(
            """SELECT j.path, j.node_id, j.cached, f.state, f.size, f.md5, f.key, f.etag, f.uploaded_at, f.last_error,
                      f.prompt_id, f.mtime_ns, jobs.create_time
               FROM job_files j JOIN jobs ON jobs.prompt_id = j.prompt_id LEFT JOIN files f ON f.path = j.path
               WHERE j.prompt_id = ? ORDER BY j.position""", (prompt_id,))
        out = []
        for r in rows:
            path, node, cached = bytes(r[0]), str(r[1]), bool(r[2])  # type: ignore[call-overload]
            since_ns = ((r[12] or 0.0) - MTIME_SLACK_S) * 1e9  # type: ignore[operator]
            mine = r[3] is not None and (cached or r[10] == prompt_id or (r[10] is None and r[11] >= since_ns))  # type: ignore[operator]
            if not mine:
                out.append(JobFile(path, node, cached))
                continue
            out.append(JobFile(path, node, cached, state=str(r[3]), size=int(r[4]),  # type: ignore[call-overload]
                               md5=r[5], key=r[6], etag=r[7], uploaded_at=r[8], error=r[9]))  # type: ignore[arg-type]
        return out

    def job_document(self, prompt_id: str) -> str | None:
        """The final document of a job that ended (None while it is open)."""
        rows = self._read("SELECT document FROM jobs WHERE prompt_id = ?", (prompt_id,))
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    def open_manifests(self) -> int:
        """Jobs ComfyUI finished that are not complete or failed here yet."""
        count = self._read("SELECT COUNT(*) FROM jobs WHERE state = ?", (UPLOADING,))[0][0]
        return count if isinstance(count, int) else 0

    def job_counts(self) -> dict[str, int]:
        found = {str(r[0]): int(r[1]) for r in self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state")}  # type: ignore[call-overload]
        return {state: found.get(state, 0) for state in JOB_STATES}

    # -- ending a job ------------------------------------------------------------------------------------

    def end_job(self, prompt_id: str, state: str, *, manifest_key: str | None, manifest_etag: str | None,
                document: str, outbox: Iterable[tuple[str, bytes]] = ()) -> None:
        """``complete`` or ``failed``, with its manifest and final document, and its webhook events queued in
        the same commit."""
        now = self._clock()
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = :state, done_at = :now, manifest_key = :key, manifest_etag = :etag, "
                       "last_error = NULL, document = :doc WHERE prompt_id = :id",
                       {"state": state, "now": now, "key": manifest_key, "etag": manifest_etag, "doc": document,
                        "id": prompt_id})
            db.executemany("INSERT OR IGNORE INTO webhooks (id, prompt_id, body, created_at) VALUES (?, ?, ?, ?)",
                           [(event_id, prompt_id, body, now) for event_id, body in outbox])

    def manifest_failed(self, prompt_id: str, *, error: str, delay_s: float) -> int:
        """The manifest PUT failed: due again in ``delay_s``; returns the attempts so far."""
        now = self._clock()
        with self._tx() as db:
            db.execute("UPDATE jobs SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                       "WHERE prompt_id = ?", (now + delay_s, error[:300], prompt_id))
            return int(db.execute("SELECT attempts FROM jobs WHERE prompt_id = ?", (prompt_id,)).fetchone()[0])

    def manifest_due(self, prompt_id: str) -> bool:
        rows = self._read("SELECT next_attempt_at FROM jobs WHERE prompt_id = ?", (prompt_id,))
        return bool(rows) and float(rows[0][0]) <= self._clock()  # type: ignore[arg-type]

    # -- the webhook outbox ------------------------------------------------------------------------------

    def queue_webhook(self, event_id: str, prompt_id: str | None, body: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO webhooks (id, prompt_id, body, created_at) VALUES (?, ?, ?, ?)",
                       (event_id, prompt_id, body, self._clock()))

    def due_webhooks(self, limit: int) -> list[tuple[str, bytes, int, float]]:
        """(id, body, attempts, created_at) of undelivered events due now, oldest first."""
        rows = self._read("SELECT id, body, attempts, created_at FROM webhooks WHERE delivered_at IS NULL AND "
                          "next_attempt_at <= ? ORDER BY created_at, id LIMIT ?", (self._clock(), limit))
        return [(str(r[0]), bytes(r[1]), int(r[2]), float(r[3])) for r in rows]  # type: ignore[call-overload, arg-type]

    def webhook_delivered(self, event_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE webhooks SET delivered_at = ?, attempts = attempts + 1, last_error = NULL "
                       "WHERE id = ?", (self._clock(), event_id))

    def webhook_retry(self, event_id: str, *, error: str, delay_s: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE webhooks SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                       "WHERE id = ?", (self._clock() + delay_s, error[:300], event_id))

    def webhook_backlog(self) -> tuple[int, float, float | None]:
        """(undelivered events, seconds since the oldest was queued, seconds until the next one is due)."""
        row = self._read("SELECT COUNT(*), MIN(created_at), MIN(next_attempt_at) FROM webhooks "
                         "WHERE delivered_at IS NULL")[0]
        now = self._clock()
        count = int(row[0])  # type: ignore[call-overload]
        if not count:
            return 0, 0.0, None
        return count, max(0.0, now - float(row[1])), max(0.0, float(row[2]) - now)  # type: ignore[arg-type]
