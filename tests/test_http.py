"""Tests for sidecar.http over real sockets on 127.0.0.1, with urllib as the client."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import resource
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.errors import ConfigError, SidecarError
from sidecar.http import HttpServer
from sidecar.logs import configure_logging
from sidecar.metrics import Metrics

TOKEN = "s3cr3t-t0ken-value"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore any HTTP(S)_PROXY


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


@dataclass
class Probes:
    """Health, readiness and status answers the test can change while the server runs."""

    healthy: bool = True
    ready: bool = True
    status: dict[str, Any] = field(default_factory=lambda: {"queue": {"pending": 2}, "version": "0.1.0"})
    fail_with: Exception | None = None

    def health_probe(self) -> tuple[bool, dict[str, Any]]:
        if self.fail_with is not None:
            raise self.fail_with
        return self.healthy, {"watcher": "inotify"}

    def ready_probe(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"journal": "open", "ok": "ignored"}

    def status_probe(self) -> dict[str, Any]:
        return self.status


def request(port: int, path: str, *, token: str | None = None, method: str = "GET") -> Reply:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with OPENER.open(req, timeout=5) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


Make = Callable[..., HttpServer]


@pytest.fixture
def probes() -> Probes:
    """Probe answers shared by the server and the test."""
    return Probes()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry holding the daemon's metrics."""
    registry = CollectorRegistry()
    Metrics(registry).uploads.labels(outcome="success").inc()
    return registry


@pytest.fixture
def make(probes: Probes, registry: CollectorRegistry) -> Iterator[Make]:
    """Build and start servers on a free port; every one is stopped at the end of the test."""
    servers: list[HttpServer] = []

    def _make(token: str | None = None, port: int = 0, start: bool = True) -> HttpServer:
        server = HttpServer(
            "127.0.0.1", port, registry, token=token, health=probes.health_probe, ready=probes.ready_probe,
            status=probes.status_probe,
        )
        servers.append(server)
        if start:
            server.start()
        return server

    yield _make
    for server in servers:
        server.stop()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Structured DEBUG logging captured into a stream; back to INFO afterwards."""
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)
    yield stream
    configure_logging("INFO", "json", io.StringIO())


def _events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_metrics_exposition(make: Make) -> None:
    """GET /metrics returns the Prometheus text format with the registry's metrics."""
    reply = request(make().port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert 'sidecar_build_info{version="' in text
    assert 'sidecar_uploads_total{outcome="success"} 1.0' in text


def test_healthz_ok(make: Make) -> None:
    """GET /healthz answers 200 with ok=true first and the probe's details."""
    reply = request(make().port, "/healthz")
    assert reply.status == 200
    body = reply.json()
    assert body == {"ok": True, "watcher": "inotify"}
    assert next(iter(body)) == "ok"


def test_healthz_unhealthy_is_503(make: Make, probes: Probes) -> None:
    """GET /healthz answers 503 with ok=false when the probe says unhealthy."""
    probes.healthy = False
    reply = request(make().port, "/healthz")
    assert (reply.status, reply.json()) == (503, {"ok": False, "watcher": "inotify"})


def test_readyz_follows_its_probe(make: Make, probes: Probes) -> None:
    """GET /readyz answers 200 or 503 from the readiness probe; details cannot override ok."""
    server = make()
    assert (request(server.port, "/readyz").status, request(server.port, "/readyz").json()) == (
        200, {"ok": True, "journal": "open"},
    )
    probes.ready = False
    reply = request(server.port, "/readyz")
    assert (reply.status, reply.json()["ok"]) == (503, False)


def test_status_returns_json(make: Make, probes: Probes) -> None:
    """GET /status returns the status callable's dict as JSON."""
    reply = request(make().port, "/status")
    assert (reply.status, reply.json()) == (200, probes.status)


def test_status_serialises_unusual_values(make: Make, probes: Probes) -> None:
    """Values JSON cannot encode natively (paths, datetimes) are sent as strings, not a 500."""
    probes.status = {"watch_dir": Path("/workspace/outputs"), "at": datetime(2025, 1, 2, tzinfo=UTC)}
    reply = request(make().port, "/status")
    assert reply.status == 200
    assert reply.json() == {"watch_dir": "/workspace/outputs", "at": "2025-01-02 00:00:00+00:00"}


def test_unknown_path_is_404_json(make: Make) -> None:
    """An unknown path answers 404 with a JSON error."""
    reply = request(make().port, "/nope")
    assert (reply.status, reply.json()) == (404, {"error": "not_found"})


def test_query_string_is_ignored_for_routing(make: Make) -> None:
    """A query string does not change the route."""
    assert request(make().port, "/healthz?verbose=1").status == 200


def test_head_has_headers_but_no_body(make: Make) -> None:
    """HEAD answers like GET with Content-Length but an empty body."""
    reply = request(make().port, "/status", method="HEAD")
    assert reply.status == 200
    assert int(reply.headers["content-length"]) > 0
    assert reply.body == b""


def test_unsupported_method_is_json(make: Make) -> None:
    """A POST gets 405 with a JSON body and the methods that are served."""
    reply = request(make().port, "/status", method="POST")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert reply.json() == {"error": "method_not_allowed"}


def _raw_exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read until the server closes; a reset (the server closed on unread input) reads as b''."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        try:
            conn.sendall(raw)
            return conn.makefile("rb").read()
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize(
    ("raw", "statuses"),
    [
        (b"GARBAGE\r\n\r\n", {b"400"}),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", {b"431", b""}),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n", {b"431", b""}),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + b"c" * 4096, {b"413"}),
    ],
    ids=["garbage", "long-request-line", "header-over-cap", "body-over-cap"],
)
def test_malformed_or_oversized_requests_are_refused(
    make: Make, raw: bytes, statuses: set[bytes], log_stream: io.StringIO
) -> None:
    """Garbage gets 400; a head over 16 KiB gets 431 or a closed connection; a body gets 413. None reach the app."""
    port = make().port
    response = _raw_exchange(port, raw)
    status = response.split(b" ", 2)[1] if response else b""
    assert status in statuses, response[:200]
    assert not [e for e in _events(log_stream) if e["event"] in ("http_request", "http_handler_failed")]
    assert request(port, "/healthz").status == 200, "the server keeps serving"


def test_probe_exception_is_500_with_class_only(make: Make, probes: Probes, log_stream: io.StringIO) -> None:
    """A probe that raises gives 500 naming only the exception class, logged as http_handler_failed."""
    probes.fail_with = RuntimeError("password=hunter2 in a message")
    server = make()
    reply = request(server.port, "/healthz")
    assert (reply.status, reply.json()) == (500, {"ok": False, "error": "RuntimeError"})
    assert b"hunter2" not in reply.body
    (failed,) = [e for e in _events(log_stream) if e["event"] == "http_handler_failed"]
    assert (failed["level"], failed["path"], failed["error"]) == ("error", "/healthz", "RuntimeError")
    assert request(server.port, "/status").status == 200, "the server keeps serving"


def test_token_required_except_healthz(make: Make) -> None:
    """With a token, /metrics, /readyz, /status and unknown paths need it; /healthz stays open."""
    port = make(token=TOKEN).port
    for path in ("/metrics", "/readyz", "/status", "/nope"):
        reply = request(port, path)
        assert reply.status == 401, path
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert reply.json() == {"error": "unauthorized"}
    assert request(port, "/healthz").status == 200


def test_wrong_token_is_refused(make: Make) -> None:
    """A wrong token, a prefix of the right one or another scheme answers 401."""
    port = make(token=TOKEN).port
    assert request(port, "/status", token="wrong").status == 401
    assert request(port, "/status", token=TOKEN[:-1]).status == 401
    url = f"http://127.0.0.1:{port}/status"
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        OPENER.open(req, timeout=5)
    caught.value.close()
    assert caught.value.code == 401


def test_right_token_is_accepted(make: Make) -> None:
    """The right bearer token (scheme in any case) opens every route."""
    port = make(token=TOKEN).port
    assert request(port, "/metrics", token=TOKEN).status == 200
    assert request(port, "/status", token=TOKEN).json()["version"] == "0.1.0"
    assert request(port, "/readyz", token=TOKEN).status == 200
    url = f"http://127.0.0.1:{port}/status"
    req = urllib.request.Request(url, headers={"Authorization": f"bearer {TOKEN}"})
    with OPENER.open(req, timeout=5) as resp:
        assert resp.status == 200


def test_token_never_in_responses_or_logs(make: Make, log_stream: io.StringIO, capsys: Any) -> None:
    """The token appears in no response body or header and in no log line, stdout or stderr."""
    port = make(token=TOKEN).port
    seen: list[Reply] = []
    for path in ("/metrics", "/readyz", "/status", "/healthz", "/nope"):
        for token in (None, "wrong", TOKEN):
            seen.append(request(port, path, token=token))
    for reply in seen:
        assert TOKEN.encode() not in reply.body
        assert TOKEN not in json.dumps(reply.headers)
    assert TOKEN not in log_stream.getvalue()
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_requests_logged_at_debug_not_on_stderr(make: Make, log_stream: io.StringIO, capsys: Any) -> None:
    """Each request is one DEBUG http_request line; nothing is printed on stderr."""
    port = make().port
    request(port, "/status?x=1")
    request(port, "/missing")
    lines = [e for e in _events(log_stream) if e["event"] == "http_request"]
    assert [(e["level"], e["method"], e["path"], e["status"]) for e in lines] == [
        ("debug", "GET", "/status", 200), ("debug", "GET", "/missing", 404),
    ]
    assert capsys.readouterr().err == ""


def test_busy_port_raises_at_construction(make: Make) -> None:
    """Binding a port already in use raises SidecarError naming host:port, before any thread starts."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SidecarError, match=rf"127\.0\.0\.1:{port}: address already in use"):
            make(port=port, start=False)


def test_second_server_on_same_port_is_refused(make: Make) -> None:
    """A second HttpServer on a port the first one serves fails instead of sharing it."""
    first = make()
    with pytest.raises(SidecarError, match="already in use"):
        make(port=first.port, start=False)


def test_port_zero_reports_the_bound_port(make: Make) -> None:
    """Asking for port 0 binds a free port, reported by .port before start()."""
    server = make(start=False)
    assert server.port > 0
    server.start()
    assert request(server.port, "/healthz").status == 200


def test_stop_releases_the_port(make: Make) -> None:
    """After stop() the port refuses connections and can be bound again; stop() twice is harmless."""
    server = make()
    port = server.port
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        request(port, "/healthz")
    again = make(port=port)
    assert request(again.port, "/healthz").status == 200


def test_stop_without_start_returns(make: Make) -> None:
    """stop() on a server that never started closes the socket without blocking."""
    server = make(start=False)
    server.stop()


def test_empty_token_is_refused(make: Make) -> None:
    """An empty or whitespace-containing token is a configuration mistake (ConfigError), not 'no auth'."""
    for token in ("", "two words", "tab\t"):
        with pytest.raises(ConfigError, match="SIDECAR_HTTP_TOKEN"):
            make(token=token)


def _get(port: int, path: str, headers: dict[str, str]) -> Reply:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with OPENER.open(req, timeout=5) as resp:
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())


def test_metrics_negotiates_openmetrics_and_gzip(make: Make) -> None:
    """A scraper asking for OpenMetrics gets it (ending in # EOF); one accepting gzip gets it compressed."""
    port = make().port
    open_metrics = _get(port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.body.endswith(b"# EOF\n")
    assert b"sidecar_uploads_total{outcome=\"success\"} 1.0" in open_metrics.body
    zipped = _get(port, "/metrics", {"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert b'sidecar_uploads_total{outcome="success"} 1.0' in gzip.decompress(zipped.body)
    assert zipped.headers["cache-control"] == "no-store"


def test_metrics_include_the_standard_process_families(make: Make) -> None:
    """process_* (memory, CPU, descriptors), python_info and python_gc_* are exported beside the sidecar's own."""
    text = request(make().port, "/metrics").body.decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_max_fds", "python_info", "python_gc_collections_total"):
        assert f"\n{name}" in text, name


def _trickle(port: int, stop: threading.Event, every_s: float) -> float:
    """Send a never-ending request head a byte at a time; return how long until the server cut it."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        try:
            while not stop.is_set() and time.monotonic() - started < 8.0:
                conn.sendall(b"X-A: b\r\n")
                readable, _, _ = select.select([conn], [], [], every_s)
                if readable and conn.recv(1024) == b"":
                    break
        except OSError:
            pass
        return time.monotonic() - started


def test_a_trickling_request_head_is_cut_at_its_total_deadline(probes: Probes, registry: CollectorRegistry) -> None:
    """A client that keeps sending header bytes but never ends its head is shut down after the deadline."""
    cuts: list[int] = []
    server = HttpServer("127.0.0.1", 0, registry, token=None, health=probes.health_probe,
                        ready=probes.ready_probe, status=probes.status_probe, on_cut=lambda: cuts.append(1),
                        deadline_s=1.0)
    server.start()
    stop = threading.Event()
    try:
        held = _trickle(server.port, stop, every_s=0.2)
    finally:
        stop.set()
        server.stop()
    assert 1.0 <= held < 8.0, "per-read timeouts alone would have kept it open until the test stopped it"
    assert cuts == [1]


def test_an_idle_keepalive_connection_is_cut_but_a_slow_answer_is_not(
    probes: Probes, registry: CollectorRegistry
) -> None:
    """The deadline runs while the client owes a request, not while the app computes the answer."""
    cuts: list[int] = []
    release = threading.Event()

    def slow_status() -> dict[str, Any]:
        release.wait(2.5)  # longer than the deadline
        return {"slow": True}

    server = HttpServer("127.0.0.1", 0, registry, token=None, health=probes.health_probe,
                        ready=probes.ready_probe, status=slow_status, on_cut=lambda: cuts.append(1),
                        deadline_s=1.0)
    server.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/status")
        answer = conn.getresponse()
        assert (answer.status, json.loads(answer.read())) == (200, {"slow": True})
        assert cuts == []
        idle_from = time.monotonic()
        sock = conn.sock
        assert sock is not None
        readable, _, _ = select.select([sock], [], [], 8.0)
        assert readable and sock.recv(1) == b"", "the idle keep-alive connection was closed by the server"
        assert time.monotonic() - idle_from >= 0.9
        assert cuts == [1]
        conn.close()
    finally:
        server.stop()


def test_connection_limit_raises_the_descriptor_limit_or_fits_under_it() -> None:
    """With room under the hard limit the soft limit is raised; without, the limit shrinks to what fits."""
    script = textwrap.dedent("""
        import resource, sys
        from sidecar.http import connection_limit
        soft, hard = map(int, sys.argv[1:3])
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        print(connection_limit(1024), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1280:
        pytest.skip(f"this machine's hard descriptor limit ({hard}) is below 1280")
    raised = subprocess.run([sys.executable, "-c", script, "300", "2000"], capture_output=True, text=True, check=True)
    assert raised.stdout.split() == ["1024", "1280"]
    capped = subprocess.run([sys.executable, "-c", script, "300", "300"], capture_output=True, text=True, check=True)
    assert capped.stdout.split() == ["44", "300"]


def test_an_idle_server_sleeps(make: Make) -> None:
    """The event loop blocks in poll() between requests: an idle second costs a few ms of CPU, not a core.

    A regression guard with a wide margin (the loop once spun at 100 % of a core: waitress takes its loop
    timeout as whole seconds, and 0.5 became 0), not a speed measurement.
    """
    server = make()
    assert request(server.port, "/healthz").status == 200
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(2.0)  # the idle period being measured, not a wait for a condition
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert used < 0.5, f"{used:.2f} CPU s in 2 s idle"


def test_a_restart_binds_the_port_despite_connections_in_time_wait(make: Make) -> None:
    """The server closes HTTP/1.0 connections first, leaving them in TIME_WAIT on its port; a new server on
    that port (the daemon restarted by supervisord, a pod restarted with host networking) still binds."""
    first = make()
    port = first.port
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert conn.makefile("rb").read().startswith(b"HTTP/1.0 200")
    first.stop()
    again = make(port=port)
    assert request(again.port, "/healthz").status == 200
