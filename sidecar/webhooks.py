"""Webhooks: one signed POST per finished job (``job.complete``, ``job.failed``), and with
``SIDECAR_WEBHOOK_EVENTS=job,file`` one per stored file (``file.stored``), delivered at least once from the
journal's outbox.

Signed as the Standard Webhooks specification says (https://www.standardwebhooks.com): headers
``webhook-id`` (stable across retries: receivers deduplicate on it), ``webhook-timestamp`` (Unix seconds of
this attempt) and ``webhook-signature`` = ``v1,`` + base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>")). A
secret of the form ``whsec_<base64>`` is used as the spec's base64 key; any other value as its UTF-8 bytes.

Events are queued in the same journal commit that ends the job, so a crash cannot lose one; a 2xx answer
marks it delivered; anything else (a refusal, a timeout, 5xx, 4xx) is retried with backoff (1 s doubling to
5 min, with jitter) on this thread alone, so a dead receiver never delays an upload. The URL's path and query
and the secret are never logged.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import structlog

from sidecar.backoff import backoff
from sidecar.errors import JournalError
from sidecar.journal import Journal
from sidecar.metrics_jobs import JobMetrics
from sidecar.mime import content_type
from sidecar.urls import Urls

log = structlog.get_logger("sidecar.webhooks")

TIMEOUT_S = 10.0
RETRY_BASE_S = 1.0
RETRY_CAP_S = 300.0
BATCH = 20


def signing_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            pass
    return secret.encode("utf-8")


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class Webhooks:
    """The outbox's delivery thread."""

    def __init__(self, url: str, secret: str, *, journal: Journal, metrics: JobMetrics, urls: Urls | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._urls = urls
        self._url = url
        self._secret = secret
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._wake = threading.Event()
        self.host = urlsplit(url).netloc.rpartition("@")[2]

    def wake(self) -> None:
        self._wake.set()

    def file_stored(self, *, path: str, key: str, size: int, md5: str, prompt_id: str | None) -> None:
        """``SIDECAR_WEBHOOK_EVENTS=job,file``: one ``file.stored`` event per object written."""
        event_id = f"msg_{uuid.uuid5(uuid.NAMESPACE_URL, f'file/{key}/{md5}').hex}"
        stamp = dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC).isoformat(timespec="milliseconds")
        data = {"path": path, "key": key, "bytes": size, "md5": md5, "content_type": content_type(path),
                "url": self._urls.url(key) if self._urls is not None else None, "prompt_id": prompt_id}
        body = json.dumps({"type": "file.stored", "timestamp": stamp.replace("+00:00", "Z"), "data": data})
        self._journal.queue_webhook(event_id, prompt_id, body.encode("utf-8"))
        self._wake.set()

    def deliver(self, event_id: str, body: bytes) -> str:
        """One attempt; '' when the receiver took it, else a short reason."""
        stamp = int(self._clock())
        request = urllib.request.Request(self._url, data=body, method="POST", headers={  # noqa: S310 - http(s)
            "Content-Type": "application/json", "User-Agent": "comfyui-r2-sidecar",
            "webhook-id": event_id, "webhook-timestamp": str(stamp),
            "webhook-signature": sign(self._secret, event_id, stamp, body),
        })
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310 - http(s), checked
                answer.read(4096)
                code = int(answer.status)
        except urllib.error.HTTPError as exc:
            code = int(exc.code)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"{type(reason).__name__}: {reason}"[:200]
        return "" if 200 <= code < 300 else f"HTTP {code}"

    def run_once(self) -> float | None:
        """Deliver what is due; returns seconds until the next event is due (None: nothing queued)."""
        for event_id, body, attempts, created_at in self._journal.due_webhooks(BATCH):
            problem = self.deliver(event_id, body)
            if not problem:
                self._journal.webhook_delivered(event_id)
                self._metrics.webhook_deliveries.labels(outcome="delivered").inc()
                self._metrics.webhook_lag.observe(max(0.0, self._clock() - created_at))
                log.info("webhook_delivered", event_id=event_id, host=self.host, attempt=attempts + 1)
                continue
            delay = backoff(attempts + 1, base=RETRY_BASE_S, cap=RETRY_CAP_S)
            self._journal.webhook_retry(event_id, error=problem, delay_s=delay)
            self._metrics.webhook_deliveries.labels(outcome="failed").inc()
            log.warning("webhook_delivery_failed", event_id=event_id, host=self.host, attempt=attempts + 1,
                        error=problem, retry_in_s=round(delay, 2))
        return self._journal.webhook_backlog()[2]

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                due = self.run_once()
            except JournalError:
                log.exception("webhook_journal_failed")
                due = 5.0
            self._wake.wait(timeout=30.0 if due is None else max(0.05, min(due, 30.0)))
            self._wake.clear()

    def stop(self) -> None:
        self._wake.set()
