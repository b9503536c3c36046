"""Shared fixtures: one moto S3 server subprocess per session, a fresh R2-strict proxy and a unique
bucket per test. Helpers live in ``tests/support`` (importable as ``support``)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # importlib import mode does not put tests/ on sys.path
    sys.path.insert(0, _TESTS_DIR)

from support.daemon import DaemonProcess  # noqa: E402
from support.e2e import World  # noqa: E402
from support.proxy import R2Proxy  # noqa: E402
from support.s3server import S3Server  # noqa: E402
from support.tls import TlsFiles, make_tls_files  # noqa: E402
from support.waiting import wait_until as _wait_until  # noqa: E402

from sidecar.journal import Journal  # noqa: E402

# moto's own minimum multipart part size (S3_UPLOAD_PART_MIN_SIZE) on the session server: 1 byte, so
# multipart tests can use tiny parts. Use ``r2_proxy.rules.min_part_size = 5 * 1024 * 1024`` to get the
# real R2 limit (EntityTooSmall) from the proxy instead.
SESSION_MIN_PART_SIZE = 1


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's moto S3 server subprocess (talk to it directly to bypass the proxy)."""
    server = S3Server(min_part_size=SESSION_MIN_PART_SIZE).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA and a 127.0.0.1 certificate signed by it, for https proxies."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    """A bucket created on the server for this test only; emptied and deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_server.make_bucket(name)
    yield name
    s3_server.delete_bucket(name)


@pytest.fixture
def r2_proxy(s3_server: S3Server, tls_files: TlsFiles) -> Iterator[R2Proxy]:
    """A fresh strict R2 stand-in over **https** in front of ``s3_server``.

    Clients must trust ``r2_proxy.ca_bundle`` (``verify=`` or ``AWS_CA_BUNDLE``); botocore sends its
    default aws-chunked checksum trailers only over https, so plain http would hide that R2 failure.
    """
    with R2Proxy(s3_server.endpoint, tls=tls_files) as proxy:
        yield proxy


@pytest.fixture
def r2_proxy_http(s3_server: S3Server) -> Iterator[R2Proxy]:
    """The same strict proxy over plain http (for clients that cannot be given a CA bundle)."""
    with R2Proxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """:func:`support.waiting.wait_until` as a fixture, for tests that prefer fixtures to imports."""
    return _wait_until


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``daemon_factory(env, args=("run",))`` starts a sidecar subprocess; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(env: Mapping[str, str], args: Sequence[str] = ("run",)) -> DaemonProcess:
        proc = DaemonProcess(env, args, log_dir=tmp_path / f"daemon-{len(started)}")
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def world(tmp_path: Path, s3_server: S3Server, r2_proxy: R2Proxy, bucket: str) -> Iterator[World]:
    """A watched folder, a state folder and a bucket behind the strict https proxy; daemons stopped after."""
    w = World(tmp_path, s3_server, r2_proxy, bucket)
    try:
        yield w
    finally:
        w.close()


HINTS = {  # a fragment of a skip reason -> how to get what the skipped tests need
    "apt-get install -y prometheus": "install Debian's prometheus package (apt-get install -y prometheus) for promtool",
    "SIDECAR_TEST_IMAGE": "run `bash .ci/run` (it builds the image and runs the container suite against it)",
}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per missing tool at the end of a run that skipped tests for it, with how to get it."""
    counts = dict.fromkeys(HINTS, 0)
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for fragment in HINTS:
            counts[fragment] += fragment in reason
    for fragment, count in counts.items():
        if count:
            terminalreporter.write_line(f"{count} test(s) skipped: to run them, {HINTS[fragment]}")


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    """A fresh journal in ``tmp_path/state`` (a test module may define its own)."""
    return Journal(tmp_path / "state" / "journal.sqlite3")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty watched folder ``tmp_path/out`` (a test module may define its own)."""
    out = tmp_path / "out"
    out.mkdir()
    return out
