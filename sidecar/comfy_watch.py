"""When and what to ask ComfyUI about its prompts (for :mod:`sidecar.jobs`).

A poll is one GET of the newest jobs (:meth:`ComfyClient.recent`); each newly finished prompt costs one more
GET for its file list. When polls happen:

- with ComfyUI's websocket open (:mod:`sidecar.comfyui_ws`): on each ``status`` broadcast that does not only
  grow the queue (a prompt started or ended: two per prompt), plus one every ``WS_SAFETY_POLL_S`` while a
  prompt runs;
- without it: every ``SIDECAR_COMFYUI_POLL_S`` while there is reason to -- for ``ACTIVE_AFTER_FILE_S`` after
  an output file was recorded, while a prompt is known to run, while a client waits on a job;
- once at start. An idle pod costs no request either way.

A prompt seen running that a restarted ComfyUI no longer knows (404) is finished as ``lost``. ComfyUI down,
slow or answering garbage is said once in the log and changes nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from sidecar.comfyui import ComfyClient, ComfyUnavailable, JobReport
from sidecar.journal import Journal
from sidecar.journal_jobs import RUNNING
from sidecar.metrics_jobs import JobMetrics

log = structlog.get_logger("sidecar.jobs")

ACTIVE_AFTER_FILE_S = 15.0  # keep polling this long after an output was recorded
DOWN_POLL_S = 5.0  # ComfyUI unreachable: at most one poll per this while active
IDLE_TICK_S = 5.0  # nothing to ask: the caller's loop comes back after this
WS_SAFETY_POLL_S = 10.0  # websocket up: a poll this often while a prompt runs, in case a message was lost
LOOKUP_EVERY_S = 2.0
PENDING_RECHECK_S = 5.0
RECENT = 20


class ComfyWatch:
    """Learns prompts from ComfyUI into the journal; ``on_finished(prompt_id)`` for each newly finished one."""

    def __init__(self, client: ComfyClient, journal: Journal, metrics: JobMetrics, *,
                 on_finished: Callable[[str], None], wake: Callable[[], None], poll_s: float = 0.5) -> None:
        self.client = client
        self._journal = journal
        self._metrics = metrics
        self._on_finished = on_finished
        self._wake = wake
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._active_until = 0.0
        self._running = False
        self._lookups = 0
        self._last_lookup: dict[str, float] = {}
        self._finished_seen: set[str] = set()
        self._learned: dict[str, float] = {}  # prompt id -> when its detail was last asked for by a poll
        self._last_poll = 0.0
        self._poll_now = True  # a first look at what ComfyUI finished while we were not running
        self.websocket = False
        self._remaining: int | None = None  # queue_remaining of the last status broadcast
        self.comfy_up = False
        self.comfy_error = ""

    # -- triggers -------------------------------------------------------------------------------------

    def poke(self) -> None:
        """An output file was recorded: a prompt is probably running."""
        self._active_until = time.monotonic() + ACTIVE_AFTER_FILE_S
        self._wake()

    def on_status(self, queue_remaining: int | None) -> None:
        """A websocket ``status`` broadcast: the queue changed. One that only grew the queue (a prompt was
        queued) needs no poll: a pending prompt has written nothing; its start sends the next one."""
        grew = (queue_remaining is not None and self._remaining is not None and queue_remaining > self._remaining)
        self._remaining = queue_remaining
        if not grew:
            self._poll_now = True
            self._wake()

    def on_websocket(self, connected: bool, problem: str = "") -> None:
        """The trigger socket came up (catch up at once) or went down (poll while active, as without it)."""
        if problem:
            log.info("comfyui_websocket_unsupported", url=self.client.base_url, error=problem,
                     effect=f"polling every {self.poll_s} s while a prompt runs")
        elif connected != self.websocket:
            log.info("comfyui_websocket_" + ("connected" if connected else "lost"), url=self.client.base_url)
        self.websocket = connected
        self._remaining = None  # messages may have been missed
        self._poll_now = True
        self._wake()

    def waiting(self, delta: int) -> None:
        """A client starts (+1) or stops (-1) waiting: poll ComfyUI meanwhile."""
        with self._lock:
            self._lookups += delta
        self._wake()

    def _active(self) -> bool:
        return self._running or time.monotonic() < self._active_until or self._lookups > 0

    def poll_in(self) -> float:
        """Seconds until the next poll is due (0: now). With the websocket up, every queue change triggers one
        and only a slow safety poll runs while a prompt is known to be running."""
        if self._poll_now:
            return 0.0
        since = time.monotonic() - self._last_poll
        if self.websocket:
            return max(0.0, WS_SAFETY_POLL_S - since) if self._running else IDLE_TICK_S
        if not self._active():
            return IDLE_TICK_S
        return max(0.0, (self.poll_s if self.comfy_up else DOWN_POLL_S) - since)

    # -- asking ComfyUI ------------------------------------------------------------------------------

    def _ask(self, fn: Callable[[], Any]) -> Any:
        try:
            answer = fn()
        except ComfyUnavailable as exc:
            self._metrics.comfy_requests.labels(outcome="unavailable").inc()
            if self.comfy_up or not self.comfy_error:  # said once; a warning only if it answered before
                (log.warning if self.comfy_up else log.info)(
                    "comfyui_unavailable", url=self.client.base_url, error=str(exc),
                    effect="uploads go on; jobs stay running or unknown until ComfyUI answers")
            self.comfy_up, self.comfy_error = False, str(exc)
            raise
        self._metrics.comfy_requests.labels(outcome="ok").inc()
        if not self.comfy_up:
            log.info("comfyui_available", url=self.client.base_url)
        self.comfy_up, self.comfy_error = True, ""
        return answer

    def poll_if_due(self) -> None:
        if self.poll_in() > 0:
            return
        self._poll_now = False
        self._last_poll = time.monotonic()
        try:
            reports: list[JobReport] = self._ask(lambda: self.client.recent(RECENT))
            listed = {r.prompt_id for r in reports}
            for report in reports:
                if not report.finished:
                    self._note(report)
                elif report.prompt_id not in self._finished_seen:
                    known = self._journal.job(report.prompt_id)
                    if known is not None and known.finished_at is not None:  # e.g. after our own restart
                        self._finished_seen.add(report.prompt_id)
                    else:
                        self._learn(report.prompt_id)
            now = time.monotonic()
            for prompt_id in self._journal.ids_in(RUNNING):
                # Not listed: it finished and fell off the page, was forgotten by a restarted ComfyUI, or is
                # still pending (the list leaves those out; it appears once it starts). Asked at most every
                # PENDING_RECHECK_S per prompt, so a long queue of waited-on prompts costs few requests.
                if prompt_id not in listed and now - self._learned.get(prompt_id, -PENDING_RECHECK_S) >= \
                        PENDING_RECHECK_S:
                    self._learned[prompt_id] = now
                    self._learn(prompt_id)
            self._learned = {k: v for k, v in self._learned.items() if now - v < 4 * PENDING_RECHECK_S}
            self._finished_seen &= listed
        except ComfyUnavailable:
            return
        self._running = any(not r.finished for r in reports) or bool(self._journal.ids_in(RUNNING))

    def _learn(self, prompt_id: str) -> JobReport | None:
        """One job with its files; a job we saw running that ComfyUI forgot is finished with what it wrote."""
        detail: JobReport | None = self._ask(lambda: self.client.job(prompt_id))
        if detail is None:
            known = self._journal.job(prompt_id)
            if known is not None and known.finished_at is None:
                self._journal.job_lost(prompt_id, "ComfyUI no longer knows this prompt (it restarted before "
                                                  "the prompt ended)")
                log.warning("job_lost", prompt_id=prompt_id)
            return None
        self._note(detail)
        return detail

    def _note(self, report: JobReport) -> None:
        if report.finished:
            self._finished_seen.add(report.prompt_id)
        if self._journal.note_job(report):
            log.info("job_reported", prompt_id=report.prompt_id, comfyui_status=report.status,
                     files=len(report.outputs), cached_nodes=sorted(report.cached_nodes) or None)
            if report.finished:
                self._on_finished(report.prompt_id)

    def lookup(self, prompt_id: str) -> None:
        """A client asks about a job we do not know: ask ComfyUI (at most every LOOKUP_EVERY_S per id)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_lookup.get(prompt_id, -LOOKUP_EVERY_S) < LOOKUP_EVERY_S:
                return
            self._last_lookup = {k: v for k, v in self._last_lookup.items() if now - v < 60} | {prompt_id: now}
        try:
            self._learn(prompt_id)
        except ComfyUnavailable:
            return
        self._wake()
