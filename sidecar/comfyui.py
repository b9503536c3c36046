"""What ComfyUI itself says about its prompts, read from its unmodified HTTP API (``/api/jobs``).

Only two calls are used, both documented by ComfyUI 0.8's ``comfy_execution/jobs.py`` and recorded in
``shared/comfyui-api-samples``:

``GET /api/jobs?status=in_progress,completed,failed&limit=N``
    the newest jobs that run or ran (pending ones are left out: they wrote nothing yet). The queue is FIFO, so
    a job in progress is newer than every finished one and comes first.
``GET /api/jobs/{id}``
    one job; once finished, with ``outputs`` keyed by node id in execution order, each a UI dict whose lists
    (``images``, ``audio``, ``latents``, ...) hold ``{filename, subfolder, type}``. 404 for an unknown id
    (also an id from before a ComfyUI restart: history lives in memory).

Anything else (a refused connection, a timeout, a 500, HTML, JSON of another shape) raises
:class:`ComfyUnavailable` with one short reason; nothing here retries. No credential is ever sent.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

FINISHED = ("completed", "failed")
RUNNING = ("pending", "in_progress")
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # a failed job's item carries a traceback and its inputs


class ComfyUnavailable(Exception):
    """ComfyUI did not answer usefully; the message is one line without secrets."""


@dataclass(frozen=True, slots=True)
class Output:
    """One file a node reported: ``<output dir>/<subfolder>/<filename>`` as a relative path."""

    node_id: str
    relpath: str


@dataclass(frozen=True, slots=True)
class JobReport:
    """A job as ComfyUI reports it; times are epoch seconds (ComfyUI sends milliseconds)."""

    prompt_id: str
    status: str  # pending, in_progress, completed, failed
    create_time: float | None = None
    start_time: float | None = None
    end_time: float | None = None
    outputs: tuple[Output, ...] = ()
    cached_nodes: frozenset[str] = field(default_factory=frozenset)
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _seconds(value: Any) -> float | None:
    return float(value) / 1000.0 if isinstance(value, int | float) and not isinstance(value, bool) else None


def _outputs(raw: Any) -> tuple[Output, ...]:
    """Every ``type: output`` file of every node (temp previews are not in the output folder)."""
    if not isinstance(raw, dict):
        return ()
    found: list[Output] = []
    for node_id, ui in raw.items():
        if not isinstance(ui, dict):
            continue
        for items in ui.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict) or item.get("type", "output") != "output":
                    continue
                name, sub = item.get("filename"), item.get("subfolder") or ""
                if not isinstance(name, str) or not name or not isinstance(sub, str):
                    continue
                rel = f"{sub.strip('/')}/{name}" if sub.strip("/") else name
                parts = rel.split("/")
                if any(part in ("", ".", "..") for part in parts):
                    continue  # never a path outside the output folder
                found.append(Output(str(node_id), rel))
    return tuple(found)


def _cached(status: Any) -> frozenset[str]:
    messages = status.get("messages") if isinstance(status, dict) else None
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, list) and len(message) == 2 and message[0] == "execution_cached":
            nodes = message[1].get("nodes") if isinstance(message[1], dict) else None
            return frozenset(str(n) for n in nodes) if isinstance(nodes, list) else frozenset()
    return frozenset()


def _error(body: dict[str, Any]) -> str:
    err = body.get("execution_error")
    if isinstance(err, dict):
        lines = str(err.get("exception_message", "")).strip().splitlines()
        first = lines[0].strip("* ").strip() if lines else str(err.get("exception_type", "error"))
        return f"{err.get('node_type', '?')} (node {err.get('node_id', '?')}): {first}"[:300]
    if body.get("status") == "failed":
        return "interrupted or failed without an error report"
    return ""


def parse_job(body: Any) -> JobReport:
    """A JobReport from one ``/api/jobs`` item or ``/api/jobs/{id}`` body; ComfyUnavailable if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(body.get("status"), str):
        raise ComfyUnavailable("a job without an id or status")
    return JobReport(
        prompt_id=body["id"], status=body["status"], create_time=_seconds(body.get("create_time")),
        start_time=_seconds(body.get("execution_start_time")), end_time=_seconds(body.get("execution_end_time")),
        outputs=_outputs(body.get("outputs")), cached_nodes=_cached(body.get("execution_status")),
        error=_error(body),
    )


class ComfyClient:
    """A small client of ComfyUI's job API; every call is one GET with a total timeout."""

    def __init__(self, base_url: str, *, timeout_s: float = 3.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.requests = 0  # every GET sent, for /status and the bench

    def _get(self, path: str) -> tuple[int, Any]:
        self.requests += 1
        route = path.split("?", maxsplit=1)[0]
        request = urllib.request.Request(self.base_url + path, headers={"Accept": "application/json"})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:  # noqa: S310 - http(s) only
                status, raw = int(answer.status), answer.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            status, raw = int(exc.code), exc.read(MAX_ANSWER_BYTES + 1)
        except (OSError, ValueError) as exc:  # refused, reset, timeout, a bad URL
            reason = getattr(exc, "reason", exc)
            raise ComfyUnavailable(f"GET {route}: {type(reason).__name__}: {reason}"[:200]) from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise ComfyUnavailable(f"GET {route}: answer over {MAX_ANSWER_BYTES} bytes")
        try:
            return status, json.loads(raw)
        except ValueError:
            raise ComfyUnavailable(f"GET {route}: HTTP {status}, not JSON") from None

    def recent(self, limit: int = 20) -> list[JobReport]:
        """The newest jobs in progress or finished, newest first."""
        status, body = self._get(f"/api/jobs?status=in_progress,completed,failed&limit={int(limit)}")
        jobs = body.get("jobs") if isinstance(body, dict) else None
        if status != 200 or not isinstance(jobs, list):
            raise ComfyUnavailable(f"GET /api/jobs: HTTP {status}, no job list")
        return [parse_job(item) for item in jobs]

    def job(self, prompt_id: str) -> JobReport | None:
        """One job with its outputs, or None if ComfyUI does not know it."""
        status, body = self._get(f"/api/jobs/{urllib.parse.quote(prompt_id, safe='')}")
        if status == 404:
            return None
        if status != 200:
            raise ComfyUnavailable(f"GET /api/jobs/{{id}}: HTTP {status}")
        return parse_job(body)
