"""A job as a document: what ``GET /jobs/{id}`` answers, what the manifest object holds, what a webhook sends.

Per file: its path relative to the output folder, ComfyUI's node id, where it stands, and once stored its
key, bytes, MD5, content type and URL. File states:

``stored``   in the bucket, proven by the store's ETag (a local copy deleted by retention is still stored);
``waiting``  not stored yet: being written, settling, pending, uploading or held back by a store outage;
``failed``   parked by the uploader (see ``error``) or skipped (vanished, not a regular file);
``excluded`` not uploaded by configuration (extension, include/exclude);
``missing``  ComfyUI listed it, but it never appeared on disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sidecar.journal_jobs import COMPLETE, FAILED_JOB, JobFile, JobRow
from sidecar.keys import path_text
from sidecar.mime import content_type
from sidecar.urls import Urls

STORED, WAITING, FAILED_FILE, EXCLUDED, MISSING = "stored", "waiting", "failed", "excluded", "missing"
TERMINAL_JOB = (COMPLETE, FAILED_JOB)
SCHEMA = "comfyui-r2-sidecar/job@1"


@dataclass(frozen=True, slots=True)
class FileView:
    file: JobFile
    status: str


def file_status(f: JobFile, *, wanted: bool, on_disk: bool, overdue: bool) -> str:
    """Where one listed file stands; ``overdue``: ComfyUI finished long enough ago for it to have appeared."""
    if f.state in ("uploaded", "deleted") and f.etag:
        return STORED
    if f.state in ("failed", "skipped"):
        return FAILED_FILE
    if f.state is None:
        if not wanted:
            return EXCLUDED
        if not on_disk and overdue:
            return MISSING
    return WAITING


def verdict(job: JobRow, views: list[FileView]) -> str | None:
    """The state a finished job ends in, or None while a file is still waiting."""
    if any(v.status == WAITING for v in views):
        return None
    good = job.comfy_status == "completed" and all(v.status in (STORED, EXCLUDED) for v in views)
    return COMPLETE if good else FAILED_JOB


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def document(job: JobRow, views: list[FileView], *, state: str, pod_id: str, urls: Urls,
             manifest_key: str | None) -> dict[str, Any]:
    files = []
    for v in views:
        f, stored = v.file, v.status == STORED
        rel = path_text(f.path)
        files.append({
            "path": rel, "node_id": f.node_id, "status": v.status, "cached": f.cached,
            "key": f.key if stored else None, "bytes": f.size if stored else None,
            "md5": f.md5 if stored else None, "content_type": content_type(rel),
            "url": urls.url(f.key) if stored else None,
            "error": f.error if v.status == FAILED_FILE else None,
        })
    counts = {s: sum(1 for v in views if v.status == s) for s in (STORED, WAITING, FAILED_FILE, EXCLUDED, MISSING)}
    return {
        "schema": SCHEMA, "prompt_id": job.prompt_id, "state": state, "comfyui_status": job.comfy_status,
        "error": job.error, "pod_id": pod_id, "manifest_key": manifest_key,
        "times": {"created": iso(job.create_time), "started": iso(job.start_time), "ended": iso(job.end_time),
                  "reported": iso(job.finished_at), "done": iso(job.done_at)},
        "counts": counts, "files": files,
    }


def manifest_key(template: str, *, pod_id: str, prompt_id: str) -> str:
    return template.format(pod_id=pod_id, prompt_id=prompt_id)


def encode(doc: dict[str, Any]) -> tuple[bytes, str]:
    """The manifest's bytes and their MD5."""
    body = json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=False).encode("utf-8") + b"\n"
    return body, hashlib.md5(body, usedforsecurity=False).hexdigest()
