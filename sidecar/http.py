"""The daemon's one HTTP port, served by waitress with limits a public port needs.

waitress (pure Python, no dependencies) reads request heads on one event-loop thread, so a slow or idle client
costs a socket and a few KiB, never a worker thread; only complete requests reach its small thread pool. It
caps the request head (``431``) and body, and the number of open connections. What it lacks is a *total*
deadline: its channel timeout is per read, so a client trickling a byte every few seconds would hold its
connection forever. :class:`Deadlines` adds one: a connection must send a complete request head within
``HEAD_DEADLINE_S`` of its accept, and after each answer has that long again to take the answer and send its
next request head; otherwise it is shut down. While the app computes an answer there is no deadline.
Only waitress's ``create_server``/``run``/``close`` and its documented settings are used, with a pre-bound
socket (its documented "socket activation" path).

The port is bound in the constructor, so a busy port fails the start of the daemon instead of being logged from
a background thread. Routes and authentication live in :mod:`sidecar.http_app`.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.types import WSGIEnvironment

import structlog
from prometheus_client import CollectorRegistry

from sidecar.errors import ConfigError, SidecarError
from sidecar.http_app import Probe, Routes
from sidecar.waits import MAX_WAITERS

log = structlog.get_logger(__name__)

HEAD_DEADLINE_S = 10.0  # from accept (or the previous answer) to a complete request head; then to the answer's end
MAX_CONNECTIONS = 1024  # open client connections; beyond it new ones wait in the listen backlog
FD_RESERVE = 256  # descriptors kept for the daemon itself (journal, inotify, the store's pool)
MAX_HEADER_BYTES = 16 * 1024
WORKER_THREADS = MAX_WAITERS + 4  # long polls (sidecar.waits) never take the last four


@dataclass
class _Connection:
    sock: socket.socket
    deadline: float
    busy: int = 0


class Deadlines:
    """Every accepted connection, and the moment it must have made progress by."""

    def __init__(self, deadline_s: float = HEAD_DEADLINE_S, on_cut: Callable[[], None] = lambda: None) -> None:
        self.deadline_s = deadline_s
        self.on_cut = on_cut
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], _Connection] = {}

    def accepted(self, sock: socket.socket, addr: Any) -> None:
        with self._lock:
            self._open[(str(addr[0]), int(addr[1]))] = _Connection(sock, time.monotonic() + self.deadline_s)

    def _find(self, environ: WSGIEnvironment) -> _Connection | None:
        try:
            return self._open.get((str(environ.get("REMOTE_ADDR")), int(environ.get("REMOTE_PORT") or -1)))
        except ValueError:
            return None

    def begin(self, environ: WSGIEnvironment) -> None:
        """A complete request reached the app: no deadline while it is being answered."""
        with self._lock:
            conn = self._find(environ)
            if conn is not None:
                conn.busy += 1

    def end(self, environ: WSGIEnvironment) -> None:
        """The answer is ready: the client has ``deadline_s`` to take it and send its next request head."""
        with self._lock:
            conn = self._find(environ)
            if conn is not None:
                conn.busy = max(0, conn.busy - 1)
                conn.deadline = time.monotonic() + self.deadline_s

    def sweep(self, now: float | None = None) -> int:
        """Forget closed connections and shut down overdue ones; returns how many were cut."""
        now = time.monotonic() if now is None else now
        overdue: list[socket.socket] = []
        with self._lock:
            for key, conn in list(self._open.items()):
                if conn.sock.fileno() == -1:
                    del self._open[key]
                elif not conn.busy and now >= conn.deadline:
                    overdue.append(conn.sock)
                    del self._open[key]
        for sock in overdue:
            self.on_cut()  # counted before the peer can see the end of the stream
            _shut(sock)  # the event loop sees end-of-stream and closes the channel itself
        return len(overdue)

    def cut_all(self) -> None:
        with self._lock:
            socks = [conn.sock for conn in self._open.values()]
            self._open.clear()
        for sock in socks:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the event loop or by the peer
        sock.shutdown(socket.SHUT_RDWR)


class _Listener(socket.socket):
    """A listening socket that tells :class:`Deadlines` about each connection it accepts."""

    deadlines: Deadlines

    def accept(self) -> tuple[socket.socket, Any]:
        conn, addr = super().accept()
        self.deadlines.accepted(conn, addr)
        return conn, addr


def connection_limit(wanted: int = MAX_CONNECTIONS) -> int:
    """Raise the soft descriptor limit toward ``wanted`` connections plus a reserve; return what fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - FD_RESERVE))


def _bind(host: str, port: int, deadlines: Deadlines) -> _Listener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = _Listener(family, socket.SOCK_STREAM)
    sock.deadlines = deadlines
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # SO_REUSEADDR: a restart must not fail on the last run's connections in TIME_WAIT (on Linux it never
        # lets two sockets listen on one port). No SO_REUSEPORT: a second daemon must not share the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SidecarError(
                f"cannot listen on {host}:{port}: address already in use; stop the other process "
                "or set SIDECAR_HTTP_PORT to a free port"
            ) from exc
        raise SidecarError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


class HttpServer:
    """The daemon's HTTP endpoint. The constructor binds (or raises SidecarError); start() serves.

    ``health`` and ``ready`` return ``(ok, details)``: 200 or 503 with ``{"ok": ok, **details}``.
    ``status`` returns the ``/status`` document. All three run on request threads and must be thread-safe.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, *, token: str | None, health: Probe,
        ready: Probe, status: Callable[[], dict[str, Any]], on_unauthorized: Callable[[], None] = lambda: None,
        on_cut: Callable[[], None] = lambda: None, deadline_s: float = HEAD_DEADLINE_S,
    ) -> None:
        if token is not None and (not token or any(char.isspace() for char in token)):
            raise ConfigError(
                "SIDECAR_HTTP_TOKEN: empty or contains whitespace; unset it to disable auth or set one word"
            )
        self.routes = Routes(
            registry, token=token, health=health, ready=ready, status=status, on_unauthorized=on_unauthorized,
        )
        self.deadlines = Deadlines(deadline_s, on_cut)
        self.routes.on_begin = self.deadlines.begin
        self.routes.on_end = self.deadlines.end
        self._sock = _bind(host, port, self.deadlines)
        self._host = host
        self._port = int(self._sock.getsockname()[1])
        self._server: Any = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._closed = False
        self.connection_limit = connection_limit()

    @property
    def port(self) -> int:
        """The bound port (the kernel's choice when 0 was asked for)."""
        return self._port

    def start(self) -> None:
        """Serve requests on daemon threads until stop()."""
        if self._server is not None or self._closed:
            raise RuntimeError("HttpServer.start() may be called once, before stop()")
        from waitress import create_server  # noqa: PLC0415 - only the daemon needs the server

        self._server = create_server(
            self.routes, sockets=[self._sock], threads=WORKER_THREADS, ident="comfyui-r2-sidecar",
            connection_limit=self.connection_limit, backlog=1024, max_request_header_size=MAX_HEADER_BYTES,
            max_request_body_size=1024, channel_timeout=2 * self.deadlines.deadline_s, cleanup_interval=2,
            asyncore_use_poll=True, asyncore_loop_timeout=1, expose_tracebacks=False,  # whole seconds (an int)
            log_socket_errors=False, clear_untrusted_proxy_headers=True,
        )
        self._threads = [
            threading.Thread(target=self._serve, name="sidecar-http", daemon=True),
            threading.Thread(target=self._sweep, name="sidecar-http-deadlines", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("http_started", host=self._host, port=self.port, auth=self.routes.expected is not None,
                 max_connections=self.connection_limit)

    def _serve(self) -> None:
        try:
            self._server.run()
        except Exception:  # closing from stop() can race the loop; anything else is worth a line
            if not self._stopping.is_set():
                log.error("http_server_failed", exc_info=True)

    def _sweep(self) -> None:
        while not self._stopping.wait(0.5):
            self.deadlines.sweep()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the port and every connection. Safe to call twice or without start()."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()  # the listener and the loop's wake-up pipe
        self._sock.close()
        self.deadlines.cut_all()  # with every channel gone the event loop returns
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        log.info("http_stopped", port=self.port)

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
