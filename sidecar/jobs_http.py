"""``/jobs``, ``/jobs/{prompt_id}`` and ``/idle``: what a client or a serverless handler waits on.

``GET /jobs/{id}[?wait=S]``
    200 with the job document (:mod:`sidecar.manifest`) once known; with ``wait``, answers as soon as the job
    is ``complete`` or ``failed``, or after S seconds (at most 300) with its state then. 404 ``unknown``:
    neither the journal nor ComfyUI knows the id. 400 for an id that cannot be one.
``GET /jobs[?limit=N&offset=M&state=S]``
    recent jobs, newest first, paged (``limit`` ≤ 200, default 50).
``GET /idle[?wait=S][&flush=1]``
    200 ``{"idle": true}`` when nothing is pending, uploading, settling, or a finished prompt's files or
    manifest still open; else 503 with the counts (after waiting up to S seconds). ``flush=1`` first makes
    every pending file due now (retry delays dropped).

A wait holds a server thread: at most ``Waits.max_waiters`` at once, the next gets 429 and retries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from sidecar.jobs import PROMPT_ID, Jobs
from sidecar.journal_jobs import JOB_STATES, JobRow
from sidecar.manifest import iso
from sidecar.waits import MAX_WAIT_S, TooManyWaiters, Waits

Answer = tuple[int, dict[str, Any]]
MAX_PAGE = 200


class BadRequest(Exception):
    pass


def _number(query: dict[str, list[str]], name: str, default: float, *, low: float, high: float) -> float:
    raw = query.get(name, [""])[-1]
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}")
    return value


def _summary(job: JobRow) -> dict[str, Any]:
    return {"prompt_id": job.prompt_id, "state": job.state, "comfyui_status": job.comfy_status, "error": job.error,
            "manifest_key": job.manifest_key, "seen": iso(job.seen_at), "reported": iso(job.finished_at),
            "done": iso(job.done_at)}


class JobsApi:
    def __init__(self, *, jobs: Jobs | None, waits: Waits, idle: Callable[[], dict[str, Any]],
                 flush: Callable[[], int]) -> None:
        self.jobs = jobs
        self.waits = waits
        self.idle = idle
        self.flush = flush

    def handle(self, path: str, query_string: str) -> Answer | None:  # noqa: PLR0911 - one flat route table
        """The answer for one of our paths; None for any other path."""
        if path not in {"/idle", "/jobs"} and not path.startswith("/jobs/"):
            return None
        query = parse_qs(query_string, keep_blank_values=True)
        try:
            wait = _number(query, "wait", 0.0, low=0.0, high=MAX_WAIT_S)
            if path == "/idle":
                return self._idle(wait, flush=query.get("flush", ["0"])[-1] in ("1", "true"))
            if self.jobs is None:
                return 404, {"error": "jobs_disabled", "hint": "SIDECAR_COMFYUI_URL is empty"}
            if path == "/jobs":
                return self._list(query)
            return self._job(path.removeprefix("/jobs/"), wait)
        except BadRequest as exc:
            return 400, {"error": "bad_request", "detail": str(exc)}
        except TooManyWaiters:
            return 429, {"error": "too_many_waiting_requests", "max_waiters": self.waits.max_waiters,
                         "hint": "retry in a second"}

    def _idle(self, wait: float, *, flush: bool) -> Answer:
        if flush:
            self.flush()

        def probe() -> tuple[bool, dict[str, Any]]:
            doc = self.idle()
            return bool(doc["idle"]), doc

        doc = self.waits.wait(probe, wait)
        return (200 if doc["idle"] else 503), doc

    def _list(self, query: dict[str, list[str]]) -> Answer:
        assert self.jobs is not None
        limit = int(_number(query, "limit", 50, low=1, high=MAX_PAGE))
        offset = int(_number(query, "offset", 0, low=0, high=10**9))
        state = query.get("state", [""])[-1] or None
        if state is not None and state not in JOB_STATES:
            raise BadRequest(f"state must be one of {', '.join(JOB_STATES)}")
        rows, total = self.jobs.page(limit=limit, offset=offset, state=state)
        return 200, {"jobs": [_summary(r) for r in rows],
                     "pagination": {"offset": offset, "limit": limit, "total": total,
                                    "has_more": offset + len(rows) < total}}

    def _job(self, prompt_id: str, wait: float) -> Answer:
        jobs = self.jobs
        assert jobs is not None
        if not PROMPT_ID.fullmatch(prompt_id):
            raise BadRequest("not a prompt id")
        jobs.watch.waiting(+1)
        try:
            doc = self.waits.wait(jobs.wait_probe(prompt_id, patient=wait > 0), wait)
        finally:
            jobs.watch.waiting(-1)
        if doc is None:
            return 404, {"prompt_id": prompt_id, "state": "unknown",
                         "comfyui_up": jobs.watch.comfy_up, "comfyui_error": jobs.watch.comfy_error or None}
        return 200, doc
