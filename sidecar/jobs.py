"""Jobs: which ComfyUI prompt wrote each output, and when a prompt is safely in the bucket.

ComfyUI tells a third party about prompts only through its job API, and lists a prompt's files once, when
the whole prompt ends (shared/FIELD-NOTES.md §7). A poll is one GET of the newest jobs; each newly finished
prompt costs one more GET for its file list. When polls happen:

- with ComfyUI's websocket open (:mod:`sidecar.comfyui_ws`): on each ``status`` broadcast (a prompt queued,
  started, ended: about three per prompt), plus one every ``WS_SAFETY_POLL_S`` while a prompt runs;
- without it: every ``SIDECAR_COMFYUI_POLL_S`` while there is reason to -- for ``ACTIVE_AFTER_FILE_S`` after
  an output file was recorded, while a prompt is known to run, while a client waits on an unknown job;
- once at start. An idle pod costs no request either way.

A finished prompt's files are matched to journal rows by path (a file of a prompt is not older than the
prompt, except on a node ComfyUI answered from its cache). When each one is stored or failed for good, the
manifest is PUT (once: its key is fixed per prompt, and written with If-None-Match) and the job ends
``complete`` or ``failed`` with its webhook event queued in the same commit. ComfyUI down, slow, restarting
or answering garbage never touches uploads: it only leaves jobs ``running`` or ``unknown``.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from sidecar.backoff import backoff
from sidecar.comfyui import ComfyClient, ComfyUnavailable, JobReport
from sidecar.errors import JournalError, KeyExistsError, StoreError
from sidecar.filters import PathFilter
from sidecar.journal import Journal
from sidecar.journal_jobs import RUNNING, UPLOADING, JobRow
from sidecar.keys import KeyBuilder, path_text
from sidecar.manifest import TERMINAL_JOB, FileView, document, encode, file_status, manifest_key, verdict
from sidecar.metrics_jobs import JobMetrics
from sidecar.store import ObjectHeaders, ObjectStore
from sidecar.urls import Urls
from sidecar.waits import Waits

log = structlog.get_logger("sidecar.jobs")

ACTIVE_AFTER_FILE_S = 15.0  # keep polling this long after an output was recorded
DOWN_POLL_S = 5.0  # ComfyUI unreachable: at most one poll per this while active
IDLE_TICK_S = 5.0  # re-check open jobs this often when nothing wakes us
WS_SAFETY_POLL_S = 10.0  # websocket up: a poll this often while a prompt runs, in case a message was lost
MISSING_GRACE_S = 10.0  # a listed file not on disk this long after ComfyUI reported it is missing
LOOKUP_EVERY_S = 2.0
RECENT = 20
PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class Jobs:
    def __init__(
        self, *, client: ComfyClient, journal: Journal, store: ObjectStore, root: Path, path_filter: PathFilter,
        urls: Urls, pod_id: str, manifest_template: str, metrics: JobMetrics, waits: Waits,
        wake_uploader: Callable[[], None], wake_webhooks: Callable[[], None] | None = None,
        poll_s: float = 0.5, clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._journal = journal
        self._store = store
        self._root = root
        self._filter = path_filter
        self.urls = urls
        self.pod_id = pod_id
        self.manifest_template = manifest_template
        self._metrics = metrics
        self._waits = waits
        self._wake_uploader = wake_uploader
        self._wake_webhooks = wake_webhooks
        self.poll_s = poll_s
        self._clock = clock
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._active_until = 0.0
        self._running = False
        self._lookups = 0
        self._last_lookup: dict[str, float] = {}
        self._finished_seen: set[str] = set()
        self._last_poll = 0.0
        self._poll_now = True  # a first look at what ComfyUI finished while we were not running
        self._ws = False
        self.comfy_up = False
        self.comfy_error = ""

    # -- signals -------------------------------------------------------------------------------------

    def poke(self) -> None:
        """An output file was recorded: a prompt is probably running."""
        self._active_until = time.monotonic() + ACTIVE_AFTER_FILE_S
        self._wake.set()

    def wake(self) -> None:
        """An upload ended: open jobs may be stored now."""
        self._wake.set()

    def on_status(self, _queue_remaining: int | None) -> None:
        """A websocket ``status`` broadcast: the queue changed (a prompt was queued, started or ended)."""
        self._poll_now = True
        self._wake.set()

    def on_websocket(self, connected: bool, problem: str = "") -> None:
        """The trigger socket came up (catch up at once) or went down (poll while active, as without it)."""
        if problem:
            log.info("comfyui_websocket_unsupported", url=self.client.base_url, error=problem,
                     effect=f"polling every {self.poll_s} s while a prompt runs")
        elif connected != self._ws:
            log.info("comfyui_websocket_" + ("connected" if connected else "lost"), url=self.client.base_url)
        self._ws = connected
        self._poll_now = True
        self._wake.set()

    def _active(self) -> bool:
        return self._running or time.monotonic() < self._active_until or self._lookups > 0

    def _poll_in(self) -> float:
        """Seconds until the next poll is due (0: now). With the websocket up, every queue change triggers one
        and only a slow safety poll runs while a prompt is known to be running."""
        if self._poll_now:
            return 0.0
        since = time.monotonic() - self._last_poll
        if self._ws:
            return max(0.0, WS_SAFETY_POLL_S - since) if self._running else IDLE_TICK_S
        if not self._active():
            return IDLE_TICK_S
        return max(0.0, (self.poll_s if self.comfy_up else DOWN_POLL_S) - since)

    # -- the thread ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                self.pass_once()
            except JournalError:
                log.exception("jobs_journal_failed")
            except Exception:  # a bug must not end job tracking for the life of the daemon
                log.exception("jobs_pass_crashed")
            self._wake.wait(timeout=min(IDLE_TICK_S, max(0.01, self._poll_in())))

    def pass_once(self) -> None:
        if self._poll_in() <= 0:
            self._poll_now = False
            self._last_poll = time.monotonic()
            self._poll()
        for prompt_id in self._journal.ids_in(UPLOADING):
            self._settle(prompt_id)
        self._waits.changed()

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

    def _poll(self) -> None:
        try:
            reports: list[JobReport] = self._ask(lambda: self.client.recent(RECENT))
            listed = {r.prompt_id for r in reports}
            for report in reports:
                if report.finished:
                    if report.prompt_id not in self._finished_seen:
                        self._learn(report.prompt_id)
                else:
                    self._note(report)
            for prompt_id in self._journal.ids_in(RUNNING):
                if prompt_id not in listed:  # pending, or forgotten by a restarted ComfyUI
                    self._learn(prompt_id)
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
                self._settle(report.prompt_id)

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
        self._wake.set()

    # -- ending a job ---------------------------------------------------------------------------------

    def _views(self, job: JobRow) -> list[FileView]:
        overdue = job.finished_at is not None and self._clock() - job.finished_at > MISSING_GRACE_S
        views = []
        for f in self._journal.job_files(job.prompt_id):
            rel = path_text(f.path)
            wanted = self._filter.skip_reason(rel) is None
            on_disk = f.state is not None or os.path.lexists(self._root / os.fsdecode(f.path))
            views.append(FileView(f, file_status(f, wanted=wanted, on_disk=on_disk, overdue=overdue)))
        return views

    def _settle(self, prompt_id: str) -> None:
        if self._journal.link_files(prompt_id):
            self._wake_uploader()  # rows held for {prompt_id} may go now
        job = self._journal.job(prompt_id)
        if job is None or job.state != UPLOADING:
            return
        views = self._views(job)
        state = verdict(job, views)
        if state is None or not self._journal.manifest_due(prompt_id):
            return
        key = etag = None
        doc = document(job, views, state=state, pod_id=self.pod_id, urls=self.urls, manifest_key=None)
        if self.manifest_template:
            key = manifest_key(self.manifest_template, pod_id=self.pod_id, prompt_id=prompt_id)
            doc["manifest_key"] = key
            try:
                key, etag = self._put_manifest(prompt_id, key, doc)
            except StoreError as exc:
                delay = backoff(job.attempts + 1, base=1.0, cap=300.0)
                self._journal.manifest_failed(prompt_id, error=str(exc), delay_s=delay)
                self._metrics.manifests.labels(outcome="failed").inc()
                log.warning("manifest_failed", prompt_id=prompt_id, key=key, error=str(exc),
                            retry_in_s=round(delay, 2))
                return
            doc["manifest_key"] = key
        events = []
        if self._wake_webhooks is not None:
            events.append((f"msg_{uuid.uuid5(uuid.NAMESPACE_URL, 'job/' + prompt_id).hex}",
                           encode({"type": f"job.{state}", "timestamp": doc["times"]["reported"], "data": doc})[0]))
        self._journal.end_job(prompt_id, state, manifest_key=key, manifest_etag=etag, outbox=events)
        self._metrics.jobs_done.labels(state=state).inc()
        if job.end_time is not None:
            self._metrics.job_lag.observe(max(0.0, self._clock() - job.end_time))
        log.info("job_done", prompt_id=prompt_id, state=state, files=len(views), manifest_key=key,
                 **{f"files_{name}": n for name, n in doc["counts"].items() if n})
        if self._wake_webhooks is not None:
            self._wake_webhooks()
        self._waits.changed()

    def _put_manifest(self, prompt_id: str, key: str, doc: dict[str, Any]) -> tuple[str, str]:
        """PUT the manifest if absent; a manifest a crash left (written, not journaled) is taken as ours."""
        body, md5 = encode(doc)
        headers = ObjectHeaders("application/json", cache_control="no-cache", metadata=(("prompt-id", prompt_id),))
        for candidate in (key, KeyBuilder.variant(key, md5)):
            try:
                etag = self._store.put(candidate, body, md5_hex=md5, headers=headers)
            except KeyExistsError:
                info = self._store.head(candidate)
                if info is not None and (info.md5 == md5 or info.claimed_md5 is not None):
                    self._metrics.manifests.labels(outcome="existing").inc()
                    return candidate, info.etag
                log.warning("manifest_key_taken", prompt_id=prompt_id, key=candidate)
                continue
            self._metrics.manifests.labels(outcome="written").inc()
            return candidate, etag
        raise KeyExistsError("the manifest key and its variant hold other objects", operation="PutObject", key=key)

    # -- answers --------------------------------------------------------------------------------------

    def describe(self, prompt_id: str) -> dict[str, Any] | None:
        job = self._journal.job(prompt_id)
        if job is None:
            return None
        key = job.manifest_key
        if key is None and self.manifest_template and job.state not in TERMINAL_JOB:
            key = manifest_key(self.manifest_template, pod_id=self.pod_id, prompt_id=prompt_id)
        return document(job, self._views(job), state=job.state, pod_id=self.pod_id, urls=self.urls,
                        manifest_key=key)

    def wait_probe(self, prompt_id: str) -> Callable[[], tuple[bool, dict[str, Any] | None]]:
        def probe() -> tuple[bool, dict[str, Any] | None]:
            doc = self.describe(prompt_id)
            if doc is None:
                self.lookup(prompt_id)
                doc = self.describe(prompt_id)
            return (doc is not None and doc["state"] in TERMINAL_JOB), doc
        return probe

    def waiting(self, delta: int) -> None:
        """A client starts (+1) or stops (-1) waiting: poll ComfyUI meanwhile."""
        with self._lock:
            self._lookups += delta
        self._wake.set()

    def page(self, *, limit: int, offset: int, state: str | None) -> tuple[list[JobRow], int]:
        return self._journal.jobs(limit=limit, offset=offset, state=state)

    def status(self) -> dict[str, Any]:
        return {"comfyui_url": self.client.base_url, "comfyui_up": self.comfy_up,
                "comfyui_error": self.comfy_error or None, "comfyui_requests": self.client.requests,
                "polling": self._poll_in() < IDLE_TICK_S, "websocket": self._ws, "jobs": self._journal.job_counts(),
                "manifest_key_template": self.manifest_template or None, "urls": self.urls.kind}
