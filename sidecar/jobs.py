"""Jobs: which ComfyUI prompt wrote each output, and when a prompt is safely in the bucket.

ComfyUI tells a third party about prompts only through its job API, and lists a prompt's files once, when
the whole prompt ends (shared/FIELD-NOTES.md §7); :mod:`sidecar.comfy_watch` decides when to ask. A
finished prompt's files are matched to journal rows by path (a file of a prompt is not older than the
prompt, except on a node ComfyUI answered from its cache). When each one is stored or failed for good, the
manifest is PUT (once: its key is fixed per prompt, and written with If-None-Match) and the job ends
``complete`` or ``failed`` with its final document and its webhook event in the same commit. ComfyUI down,
slow, restarting or answering garbage never touches uploads: it only leaves jobs ``running`` or ``unknown``.
"""

from __future__ import annotations

import json
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
from sidecar.comfy_watch import IDLE_TICK_S, ComfyWatch
from sidecar.comfyui import ComfyClient
from sidecar.errors import JournalError, KeyExistsError, StoreError
from sidecar.filters import PathFilter
from sidecar.journal import Journal
from sidecar.journal_jobs import UPLOADING, JobRow
from sidecar.keys import KeyBuilder, path_text
from sidecar.manifest import TERMINAL_JOB, FileView, document, encode, file_status, iso, manifest_key, verdict
from sidecar.metrics_jobs import JobMetrics
from sidecar.store import ObjectHeaders, ObjectStore
from sidecar.urls import Urls
from sidecar.waits import Waits

log = structlog.get_logger("sidecar.jobs")

MISSING_GRACE_S = 10.0  # a listed file not on disk this long after ComfyUI reported it is missing
LOOKUP_DEFER_S = 1.0
PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class Jobs:
    def __init__(
        self, *, client: ComfyClient, journal: Journal, store: ObjectStore, root: Path, path_filter: PathFilter,
        urls: Urls, pod_id: str, manifest_template: str, metrics: JobMetrics, waits: Waits,
        wake_uploader: Callable[[], None], wake_webhooks: Callable[[], None] | None = None,
        poll_s: float = 0.5, clock: Callable[[], float] = time.time,
    ) -> None:
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
        self._clock = clock
        self._wake = threading.Event()
        self.watch = ComfyWatch(client, journal, metrics, on_finished=self._settle, wake=self._wake.set,
                                poll_s=poll_s)

    def wake(self) -> None:
        """An upload ended: open jobs may be stored now."""
        self._wake.set()

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
            self._wake.wait(timeout=min(IDLE_TICK_S, max(0.01, self.watch.poll_in())))

    def pass_once(self) -> None:
        self.watch.poll_if_due()
        for prompt_id in self._journal.ids_in(UPLOADING):
            self._settle(prompt_id)
        self._waits.changed()

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
        doc["times"]["done"] = iso(self._clock())
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
                           encode({"type": f"job.{state}", "timestamp": doc["times"]["done"], "data": doc})[0]))
        self._journal.end_job(prompt_id, state, manifest_key=key, manifest_etag=etag, outbox=events,
                              document=json.dumps(doc))
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
        final = self._journal.job_document(prompt_id) if job.state in TERMINAL_JOB else None
        if final is not None:  # what the manifest says, even once a reused name holds other bytes
            doc: dict[str, Any] = json.loads(final)
            for f in doc["files"]:
                f["url"] = self.urls.url(f["key"]) if f["status"] == "stored" else None  # fresh presigned URLs
            return doc
        key = job.manifest_key
        if key is None and self.manifest_template and job.state not in TERMINAL_JOB:
            key = manifest_key(self.manifest_template, pod_id=self.pod_id, prompt_id=prompt_id)
        return document(job, self._views(job), state=job.state, pod_id=self.pod_id, urls=self.urls,
                        manifest_key=key)

    def wait_probe(self, prompt_id: str, *, patient: bool = False) -> Callable[[], tuple[bool, dict[str, Any] | None]]:
        """For Waits: (ended, document). An unknown id is looked up in ComfyUI; a ``patient`` waiter with the
        websocket up first gives the broadcast of the prompt's start ``LOOKUP_DEFER_S`` to make it known
        (a client usually asks right after submitting)."""
        asked_at = time.monotonic()

        def probe() -> tuple[bool, dict[str, Any] | None]:
            doc = self.describe(prompt_id)
            deferred = patient and self.watch.websocket and time.monotonic() - asked_at < LOOKUP_DEFER_S
            if doc is None and not deferred:
                self.watch.lookup(prompt_id)
                doc = self.describe(prompt_id)
            return (doc is not None and doc["state"] in TERMINAL_JOB), doc
        return probe

    def page(self, *, limit: int, offset: int, state: str | None) -> tuple[list[JobRow], int]:
        return self._journal.jobs(limit=limit, offset=offset, state=state)

    def status(self) -> dict[str, Any]:
        watch = self.watch
        return {"comfyui_url": watch.client.base_url, "comfyui_up": watch.comfy_up,
                "comfyui_error": watch.comfy_error or None, "comfyui_requests": watch.client.requests,
                "polling": watch.poll_in() < IDLE_TICK_S, "websocket": watch.websocket,
                "jobs": self._journal.job_counts(),
                "manifest_key_template": self.manifest_template or None, "urls": self.urls.kind}
