"""The WSGI application behind the HTTP port: ``/metrics``, ``/healthz``, ``/readyz``, ``/status`` and the
job routes of :mod:`sidecar.jobs_http` (``/jobs``, ``/idle``).

``/metrics`` is prometheus_client's own WSGI app, so content negotiation (OpenMetrics for a scraper that asks
for it, gzip when accepted, ``name[]`` filters) is the library's, not ours. With a token, every path except
``/healthz`` (the liveness probe) needs ``Authorization: Bearer <token>``; the token is compared in constant
time and never written to a response or a log. Only GET and HEAD are served; the query string never changes
the route and is never logged.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

log = structlog.get_logger(__name__)

Probe = Callable[[], tuple[bool, dict[str, Any]]]
Hook = Callable[[WSGIEnvironment], None]
OPEN_PATHS = frozenset({"/healthz"})
JSON_TYPE = "application/json"
METHODS = ("GET", "HEAD")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
# More routes (sidecar.jobs_http): (path, query string) -> (status, document), or None for a path not theirs.
Extra = Callable[[str, str], "tuple[int, dict[str, Any]] | None"]


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, default=str, sort_keys=False).encode("utf-8") + b"\n"


class Routes:
    """The daemon's answers; ``health``, ``ready`` and ``status`` run on request threads (thread-safe)."""

    def __init__(
        self, registry: CollectorRegistry, *, token: str | None, health: Probe, ready: Probe,
        status: Callable[[], dict[str, Any]], on_unauthorized: Callable[[], None],
    ) -> None:
        self.metrics_app = make_wsgi_app(registry)
        self.expected = token.encode("utf-8") if token is not None else None
        self.health = health
        self.ready = ready
        self.status = status
        self.on_unauthorized = on_unauthorized
        self.more_routes: Extra = lambda _path, _query: None
        # Set by the server: called when a request reaches the app and when its answer is ready.
        self.on_begin: Hook = lambda _environ: None
        self.on_end: Hook = lambda _environ: None

    def authorized(self, header: str | None) -> bool:
        if self.expected is None:
            return True
        scheme, _, presented = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # WSGI header values are latin-1 decoded; re-encoding gives back the bytes the client sent.
        return hmac.compare_digest(presented.strip().encode("latin-1", "replace"), self.expected)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        self.on_begin(environ)
        status = 500
        try:
            status, body = self._dispatch(environ, start_response)
            return body
        finally:
            self.on_end(environ)
            log.debug(
                "http_request", method=environ.get("REQUEST_METHOD"), path=environ.get("PATH_INFO", ""),
                status=status, client=environ.get("REMOTE_ADDR"), duration_s=round(time.monotonic() - started, 6),
            )

    def _dispatch(self, environ: WSGIEnvironment, start_response: StartResponse) -> tuple[int, Iterable[bytes]]:
        path = str(environ.get("PATH_INFO", ""))
        if environ.get("REQUEST_METHOD") not in METHODS:
            return _answer(start_response, 405, _json({"error": "method_not_allowed"}), {"Allow": ", ".join(METHODS)})
        if path not in OPEN_PATHS and not self.authorized(environ.get("HTTP_AUTHORIZATION")):
            self.on_unauthorized()
            headers = {"WWW-Authenticate": 'Bearer realm="sidecar"'}
            return _answer(start_response, 401, _json({"error": "unauthorized"}), headers)
        try:
            if path == "/metrics":
                return self._metrics(environ, start_response)
            code, body = self._route(path, str(environ.get("QUERY_STRING", "")))
        except Exception as exc:  # a probe's bug must not kill the thread or leak its message
            log.error("http_handler_failed", path=path, error=type(exc).__name__, exc_info=True)
            code, body = 500, _json({"ok": False, "error": type(exc).__name__})
        return _answer(start_response, code, body)

    def _metrics(self, environ: WSGIEnvironment, start_response: StartResponse) -> tuple[int, Iterable[bytes]]:
        seen: list[int] = []

        def recording(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen.append(int(status.split(" ", 1)[0]))
            return start_response(status, [*headers, ("Cache-Control", "no-store")], exc_info)

        body = list(self.metrics_app(environ, recording))  # the library's app renders eagerly; list() is cheap
        return (seen[0] if seen else 500), body

    def _route(self, path: str, query: str) -> tuple[int, bytes]:
        if path in ("/healthz", "/readyz"):
            ok, details = (self.health if path == "/healthz" else self.ready)()
            data: dict[str, Any] = {"ok": bool(ok)}
            data.update((key, value) for key, value in details.items() if key != "ok")
            return (200 if ok else 503), _json(data)
        if path == "/status":
            return 200, _json(self.status())
        answer = self.more_routes(path, query)
        if answer is not None:
            return answer[0], _json(answer[1])
        return 404, _json({"error": "not_found"})


def _answer(
    start_response: StartResponse, code: int, body: bytes, extra: dict[str, str] | None = None,
) -> tuple[int, Iterable[bytes]]:
    headers = [("Content-Type", JSON_TYPE), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    headers.extend((extra or {}).items())
    start_response(f"{code} {REASONS.get(code, 'Error')}", headers)
    return code, [body]
