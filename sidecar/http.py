"""The daemon's one HTTP port: ``/metrics``, ``/healthz``, ``/readyz`` and ``/status``.

Stdlib ``ThreadingHTTPServer`` with daemon threads. The port is bound in the constructor, so a busy port
fails the start of the daemon instead of being logged from a background thread. With a token, every path
except ``/healthz`` (the liveness probe) needs ``Authorization: Bearer <token>``: RunPod publishes exposed
ports on a public URL. The token is compared in constant time and never written to a response or a log.
"""

from __future__ import annotations

import errno
import hmac
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sidecar.errors import ConfigError, SidecarError

log = structlog.get_logger(__name__)

Probe = Callable[[], tuple[bool, dict[str, Any]]]
OPEN_PATHS = frozenset({"/healthz"})
JSON_TYPE = "application/json"
REQUEST_TIMEOUT_S = 10.0  # a client that stalls mid-request gives its thread back after this


class _App:
    """What the handler threads need: the routes' callables and the token."""

    def __init__(
        self, registry: CollectorRegistry, token: str | None, health: Probe, ready: Probe,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.registry = registry
        self.expected = token.encode("utf-8") if token is not None else None
        self.health = health
        self.ready = ready
        self.status = status
        self.on_unauthorized: Callable[[], None] = lambda: None

    def authorized(self, header: str | None) -> bool:
        if self.expected is None:
            return True
        scheme, _, presented = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Header values arrive decoded as latin-1; re-encoding gives back the bytes the client sent.
        return hmac.compare_digest(presented.strip().encode("latin-1", "replace"), self.expected)

    def route(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for a GET of ``path``; callables' exceptions propagate."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/healthz", "/readyz"):
            ok, details = (self.health if path == "/healthz" else self.ready)()
            data: dict[str, Any] = {"ok": bool(ok)}
            data.update((key, value) for key, value in details.items() if key != "ok")
            return (200 if ok else 503), JSON_TYPE, _json(data)
        if path == "/status":
            return 200, JSON_TYPE, _json(self.status())
        return 404, JSON_TYPE, _json({"error": "not_found"})


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, default=str, sort_keys=False).encode("utf-8") + b"\n"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_port = False  # never share the port with a second daemon (some Pythons default to True)
    app: _App

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a reverse DNS lookup that can hang in a pod.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The base class prints a traceback on stderr, e.g. when a scraper hangs up mid-response.
        log.debug("http_connection_error", client=str(client_address[0]), exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "comfyui-r2-sidecar"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S
    _started: float | None = None
    path = ""  # unset by the base class when the request line cannot be parsed

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        self._started = time.monotonic()
        app = cast(_Server, self.server).app
        path = urlsplit(self.path).path
        if path not in OPEN_PATHS and not app.authorized(self.headers.get("Authorization")):
            app.on_unauthorized()
            body = _json({"error": "unauthorized"})
            self._send(401, JSON_TYPE, body, send_body, {"WWW-Authenticate": 'Bearer realm="sidecar"'})
            return
        try:
            status, content_type, body = app.route(path)
        except Exception as exc:  # a probe's bug must not kill the thread or leak its message
            log.error("http_handler_failed", path=path, error=type(exc).__name__, exc_info=True)
            status, content_type = 500, JSON_TYPE
            body = _json({"ok": False, "error": type(exc).__name__})
        self._send(status, content_type, body, send_body)

    def _send(
        self, status: int, content_type: str, body: bytes, send_body: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests and unsupported methods get a JSON body instead of the stock HTML page."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        body = _json({"error": phrase.lower().replace(" ", "_")})
        send_body = self.command != "HEAD" and code >= 200 and code not in (204, 304)
        headers = {"Allow": "GET, HEAD"} if code in (405, 501) else None
        self._send(code, JSON_TYPE, body, send_body, headers)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One DEBUG line per request; the query string and headers (the token) are never logged."""
        fields: dict[str, Any] = {
            "method": self.command,
            "path": urlsplit(self.path).path,
            "status": int(code) if str(code).isdigit() else str(code),
            "client": self.client_address[0],
        }
        if self._started is not None:
            fields["duration_s"] = round(time.monotonic() - self._started, 6)
        log.debug("http_request", **fields)

    def log_message(self, format: str, *args: Any) -> None:
        """Everything else the base class would print on stderr becomes a DEBUG line."""
        log.debug("http_request", message=format % args, client=self.client_address[0])


class HttpServer:
    """The daemon's HTTP endpoint. The constructor binds (or raises SidecarError); start() serves.

    ``health`` and ``ready`` return ``(ok, details)``: 200 or 503 with ``{"ok": ok, **details}``.
    ``status`` returns the ``/status`` document. All three run on request threads and must be thread-safe.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, *, token: str | None, health: Probe,
        ready: Probe, status: Callable[[], dict[str, Any]], on_unauthorized: Callable[[], None] = lambda: None,
    ) -> None:
        if token is not None and (not token or any(char.isspace() for char in token)):
            raise ConfigError(
                "SIDECAR_HTTP_TOKEN: empty or contains whitespace; unset it to disable auth or set one word"
            )
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SidecarError(
                    f"cannot listen on {host}:{port}: address already in use; stop the other process "
                    "or set SIDECAR_HTTP_PORT to a free port"
                ) from exc
            raise SidecarError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._server.app = _App(registry, token, health, ready, status)
        self._server.app.on_unauthorized = on_unauthorized  # a refused request: counted by the caller
        self._host = host
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port (the kernel's choice when 0 was asked for)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve requests on a daemon thread until stop()."""
        if self._thread is not None or self._closed:
            raise RuntimeError("HttpServer.start() may be called once, before stop()")
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="sidecar-http",
            daemon=True,
        )
        self._thread.start()
        log.info("http_started", host=self._host, port=self.port, auth=self._server.app.expected is not None)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread. Safe to call twice or without start()."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)
        log.info("http_stopped", port=self.port)

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
