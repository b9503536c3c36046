"""End-to-end helpers: one test's world (moto + strict R2 proxy + watched folder + sidecar runs), writers
that behave like ComfyUI and other producers, and read-only views of the journal and the daemon's /status.

Nothing here sleeps to wait for a condition; the only pauses are inside :func:`write_in_chunks`, where they
are part of *how the file is written* (a writer holding its descriptor open between chunks).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.keys import path_text

from .daemon import DaemonProcess, sidecar_env
from .proxy import R2Proxy, RecordedRequest
from .s3server import S3Server
from .waiting import wait_until

POD_ID = "pod-e2e"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore any HTTP(S)_PROXY


# -- writers ----------------------------------------------------------------------------------------------


def write_at_once(path: Path, data: bytes) -> None:
    """Create the parent folders (if new) and write the file in one go, like most tools do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_via_tmp(path: Path, data: bytes, tmp_name: str) -> None:
    """Write ``tmp_name`` next to ``path``, close it, then rename it onto ``path`` (atomic writers)."""
    tmp = path.with_name(tmp_name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_renamed_while_open(path: Path, data: bytes, tmp_name: str) -> None:
    """safetensors' way: write part of a ``.tmp*`` file, rename it onto ``path`` while still open, finish."""
    tmp = path.with_name(tmp_name)
    half = len(data) // 2
    with tmp.open("wb") as out:
        out.write(data[:half])
        out.flush()
        os.replace(tmp, path)
        out.write(data[half:])


def write_like_a_video(path: Path, data: bytes, *, seconds: float, pause_at_s: float, pause_s: float) -> None:
    """An encoder's way: 64 KiB chunks on the final path for ``seconds``, with one ``pause_s`` stop (fd open)
    after ``pause_at_s``, as when frames come slower than they are encoded (FIELD-NOTES §2)."""
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    started, paused = time.monotonic(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
            if not paused and time.monotonic() - started >= pause_at_s:
                time.sleep(pause_s)
                paused = True
            time.sleep(seconds / len(chunks))


def write_in_chunks(path: Path, data: bytes, chunks: int, pause_s: float) -> None:
    """Write in place on the final path in ``chunks`` flushed pieces, ``pause_s`` apart, fd held open (PIL)."""
    step = -(-len(data) // chunks)
    with path.open("wb") as out:
        for n, start in enumerate(range(0, len(data), step)):
            if n:
                time.sleep(pause_s)  # the writer is still encoding: part of how this file is written
            out.write(data[start : start + step])
            out.flush()


def md5_b64(data: bytes) -> str:
    """The Content-MD5 header value of ``data``."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


# -- the journal, read-only -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalRow:
    """One row of the daemon's journal as the tests see it."""

    path: str
    state: str
    attempts: int
    last_error: str | None
    error_class: str | None
    key: str | None
    size: int
    upload_id: str | None = None


def journal_rows(state_dir: Path) -> dict[str, JournalRow]:
    """Every journal row by relative path, read through a separate read-only SQLite connection."""
    return read_journal(state_dir / "journal.sqlite3")


def read_journal(db_path: Path) -> dict[str, JournalRow]:
    """Every row of the journal at ``db_path`` by relative path (``os.fsdecode``), read-only.

    A journal inside another mount namespace (``/proc/<pid>/root/...``, which SQLite cannot open by name) is
    read from a copy of the database and its WAL.
    """
    if not db_path.exists():
        return {}
    if str(db_path).startswith("/proc/"):
        with tempfile.TemporaryDirectory(prefix="journal-copy-") as tmp:
            for suffix in ("", "-wal"):
                source = Path(f"{db_path}{suffix}")
                if source.exists():
                    shutil.copyfile(source, Path(tmp) / f"journal.sqlite3{suffix}")
            return read_journal(Path(tmp) / "journal.sqlite3")
    conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT path, state, attempts, last_error, error_class, key, size, upload_id FROM files"
        ).fetchall()
    finally:
        conn.close()
    out = {}
    for path, state, attempts, last_error, error_class, key, size, upload_id in rows:
        rel = os.fsdecode(bytes(path))
        out[rel] = JournalRow(rel, state, attempts, last_error, error_class, key, size, upload_id)
    return out


def states(rows: Mapping[str, JournalRow]) -> Counter[str]:
    """How many rows are in each state."""
    return Counter(row.state for row in rows.values())


# -- one test's world -------------------------------------------------------------------------------------


class World:
    """The moving parts of one end-to-end test.

    The moto server (read directly, never through the proxy), the strict R2 proxy the daemon talks to,
    one bucket, a watched folder ``out/`` and a state folder ``state/`` under ``tmp_path``, and every
    sidecar process started from here (stopped by :meth:`close`). ``written`` maps each relative path
    the test wrote to its final bytes.
    """

    def __init__(self, tmp_path: Path, s3: S3Server, proxy: R2Proxy, bucket: str, **extra: str | float) -> None:
        self.tmp_path = tmp_path
        self.s3 = s3
        self.proxy = proxy
        self.bucket = bucket
        self.out = tmp_path / "out"
        self.state = tmp_path / "state"
        self.out.mkdir(parents=True, exist_ok=True)
        settings: dict[str, str | float] = {"RUNPOD_POD_ID": POD_ID, "settle_s": 0.05}
        settings.update(extra)
        self.env = sidecar_env(tmp_path, proxy.endpoint, bucket, ca_bundle=proxy.ca_bundle, **settings)
        if proxy.rules.signing_secret is not None:  # the proxy checks SigV4 with the secret the daemon uses
            proxy.rules.signing_secret = self.env["SIDECAR_SECRET_ACCESS_KEY"]
        self.written: dict[str, bytes] = {}
        self._procs: list[DaemonProcess] = []

    # -- processes ----------------------------------------------------------------------------------------

    def process(self, *args: str, **env: str | float) -> DaemonProcess:
        """An unstarted ``python -m sidecar <args>`` with this world's environment plus ``env``."""
        merged = dict(self.env)
        merged.update((env_name(name), str(value)) for name, value in env.items())
        log_dir = self.tmp_path / "logs" / f"{len(self._procs):02d}-{args[0] if args else 'run'}"
        proc = DaemonProcess(merged, args or ("run",), log_dir=log_dir)
        self._procs.append(proc)
        return proc

    def start(self, *, python: str | None = None, user: int | None = None, **env: str | float) -> DaemonProcess:
        """Start ``sidecar run`` (optionally with another interpreter, as another uid) and wait until it has
        started (its startup scan is requested by then)."""
        proc = self.process("run", **env)
        if python is not None:
            proc.python = python
        proc.user = user
        proc.start()
        wait_until(
            lambda: proc.events("daemon_started") or not proc.is_running(),
            timeout=20,
            message=proc.output,
        )
        assert proc.is_running(), proc.output()
        return proc

    def cli(self, *args: str, timeout: float = 30, **env: str | float) -> tuple[int, str, str]:
        """Run a one-shot ``sidecar`` command; (exit code, stdout, stderr)."""
        proc = self.process(*args, **env).start()
        code = proc.wait(timeout)
        return code, proc.raw_stdout(), proc.raw_stderr()

    def close(self) -> None:
        for proc in self._procs:
            proc.stop()

    def all_output(self) -> str:
        """stdout and stderr of every process started from this world, for "never printed" checks."""
        return "".join(proc.raw_stdout() + proc.raw_stderr() for proc in self._procs)

    # -- files ---------------------------------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        return self.out / rel

    def remember(self, rel: str, data: bytes) -> str:
        self.written[rel] = data
        return rel

    @staticmethod
    def key(rel: str) -> str:
        """The object key of ``rel`` under the default template ``{pod_id}/{relpath}`` (``{relpath}`` is the
        escaped path text: control bytes, invalid UTF-8 and ``%`` as ``%XX``)."""
        return f"{POD_ID}/{path_text(os.fsencode(rel))}"

    def expected(self, rels: Iterable[str] | None = None) -> dict[str, bytes]:
        """``{key: final bytes}`` of the given (default: all written) files."""
        chosen = self.written if rels is None else {rel: self.written[rel] for rel in rels}
        return {self.key(rel): data for rel, data in chosen.items()}

    # -- the bucket (read directly from moto) ---------------------------------------------------------------

    def bucket_keys(self) -> set[str]:
        return set(self.s3.keys(self.bucket))

    def objects(self) -> dict[str, bytes]:
        return self.s3.objects(self.bucket)

    def bucket_diff(self, expected: Mapping[str, bytes]) -> list[str]:
        """Short descriptions of how the bucket differs from ``expected`` (``[]`` when it matches exactly)."""
        actual = self.objects()
        problems = [f"missing {key}" for key in sorted(expected.keys() - actual.keys())]
        problems += [f"unexpected {key} ({len(actual[key])} bytes)" for key in sorted(actual.keys() - expected.keys())]
        problems += [
            f"differs {key}: {len(actual[key])} bytes in the bucket, {len(expected[key])} on disk"
            for key in sorted(expected.keys() & actual.keys())
            if actual[key] != expected[key]
        ]
        return problems

    def wait_in_bucket(self, rels: Iterable[str], proc: DaemonProcess | None = None, timeout: float = 30) -> None:
        """Wait until the key of every one of ``rels`` exists in the bucket."""
        wanted = {self.key(rel) for rel in rels}

        def why() -> str:
            return f"missing {sorted(wanted - self.bucket_keys())[:5]}\n{proc.output()[-4000:] if proc else ''}"

        wait_until(lambda: wanted <= self.bucket_keys(), timeout=timeout, interval=0.05, message=why)

    # -- the journal and the daemon's view --------------------------------------------------------------------

    def journal(self) -> dict[str, JournalRow]:
        return journal_rows(self.state)

    def status(self, proc: DaemonProcess) -> dict[str, Any]:
        """The running daemon's ``/status`` document (its port comes from the ``http_started`` log line)."""
        started = wait_until(lambda: proc.events("http_started"), timeout=10, message=proc.output)
        port = started[0]["port"]
        with _OPENER.open(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def _url(self, proc: DaemonProcess, path: str) -> str:
        started = wait_until(lambda: proc.events("http_started"), timeout=10, message=proc.output)
        return f"http://127.0.0.1:{started[0]['port']}{path}"

    def metrics(self, proc: DaemonProcess) -> str:
        """The running daemon's ``/metrics`` exposition."""
        with _OPENER.open(self._url(proc, "/metrics"), timeout=5) as resp:
            return str(resp.read().decode())

    def ready(self, proc: DaemonProcess) -> int:
        """The HTTP status of the running daemon's ``/readyz``."""
        try:
            with _OPENER.open(self._url(proc, "/readyz"), timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def wait_idle(self, proc: DaemonProcess, timeout: float = 30) -> dict[str, Any]:
        """Wait until nothing is settling, pending, uploading or in flight; returns that /status."""

        def idle() -> dict[str, Any] | None:
            status = self.status(proc)
            counts = status["counts"]
            busy = counts["pending"]["files"] + counts["uploading"]["files"] + status["inflight"] + status["settling"]
            return status if busy == 0 and status.get("last_scan") else None

        return wait_until(idle, timeout=timeout, interval=0.05, message=proc.output)

    # -- the proxy's record ---------------------------------------------------------------------------------

    def puts_by_key(self) -> dict[str, list[RecordedRequest]]:
        out: dict[str, list[RecordedRequest]] = {}
        for req in self.proxy.puts():
            if req.key is not None:
                out.setdefault(req.key, []).append(req)
        return out

    def complete_puts_only(self, expected: Mapping[str, bytes]) -> list[str]:
        """Problems with PUTs of ``expected`` keys: a PUT whose Content-MD5 (what the daemon meant to send) is
        not that of the file's final bytes, or an accepted PUT whose body was not exactly those bytes.

        A rejected PUT may carry a short body when the daemon was killed mid-send; its header still tells
        which content the daemon had read.
        """
        problems = []
        for key, reqs in self.puts_by_key().items():
            if key not in expected:
                continue
            final = expected[key]
            for req in reqs:
                if req.headers.get("content-md5") != md5_b64(final):
                    problems.append(f"{key}: PUT (status {req.status}) of other content than the final file")
                elif req.ok and req.payload_len != len(final):
                    problems.append(f"{key}: accepted PUT of {req.payload_len} bytes, final file {len(final)}")
        return problems


def env_name(name: str) -> str:
    """The variable ``sidecar_env`` makes of a keyword: ``workers`` -> ``SIDECAR_WORKERS``."""
    upper = name.upper()
    return upper if upper.startswith(("SIDECAR_", "AWS_", "RUNPOD_")) else f"SIDECAR_{upper}"
