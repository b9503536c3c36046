"""Fault-injection helpers: one scenario's rig, daemons under a command prefix (user namespaces, dropped
privileges, umask), a discarding S3 sink for huge files, metric scraping, the bucket audit, and the figures
that feed ``docs/RELIABILITY.md``.

Nothing here mocks anything: the daemon is ``python -m sidecar run`` as a real process, faults come from the
proxy, from signals, from the kernel (namespaced limits, a full tmpfs) or from the files themselves.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sidecar.keys import path_text

from .daemon import DaemonProcess, sidecar_env
from .e2e import JournalRow as Row
from .e2e import read_journal as journal_rows
from .proxy import R2Proxy, RecordedRequest
from .s3server import S3Server
from .waiting import wait_until

POD_ID = "pod-f"
MIB = 1024 * 1024
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore any HTTP(S)_PROXY
FIGURES_ENV = "SIDECAR_RELIABILITY_FIGURES"  # append one JSON line per scenario to this file when set


# -- processes ------------------------------------------------------------------------------------------------


class PrefixedDaemon(DaemonProcess):
    """A :class:`DaemonProcess` started as ``<prefix...> python -m sidecar <args>``, optionally as another
    user or with another umask. With ``exec`` in the prefix the pid is the sidecar's own."""

    def __init__(
        self,
        env: Mapping[str, str],
        args: Sequence[str] = ("run",),
        *,
        prefix: Sequence[str] = (),
        user: int | None = None,
        umask: int = -1,
        log_dir: Path | None = None,
    ) -> None:
        super().__init__(env, args, log_dir=log_dir)
        self.prefix = list(prefix)
        self.user = user
        self.umask = umask

    def start(self) -> PrefixedDaemon:
        if self._proc is not None:
            raise RuntimeError("daemon already started")
        extra: dict[str, Any] = {}
        if self.user is not None:
            extra.update(user=self.user, group=self.user, extra_groups=[])
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "sidecar", *self.args],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, umask=self.umask,
                **extra,
            )
        return self


def userns_available() -> bool:
    """True when ``unshare -U -r`` works here and lets us set our own inotify limits in the namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 7 > /proc/sys/user/max_inotify_watches"],
        capture_output=True, check=False, timeout=10,
    )
    return probe.returncode == 0


def userns_prefix(
    *, max_watches: int | None = None, max_instances: int | None = None, tmpfs: Path | None = None,
    tmpfs_kib: int = 0,
) -> list[str]:
    """``unshare -U -r [-m] sh -c '<setup>; exec "$@"' sh``: a user namespace (root inside, us outside) with
    its own inotify limits (``/proc/sys/user/*`` are per namespace) and optionally a private tmpfs.

    ``fs.inotify.max_queued_events`` is *not* per namespace: writing it here would change the host's value,
    so this helper never does (the overflow test stops the daemon with SIGSTOP instead).
    """
    steps = []
    if max_watches is not None:
        steps.append(f"echo {int(max_watches)} > /proc/sys/user/max_inotify_watches")
    if max_instances is not None:
        steps.append(f"echo {int(max_instances)} > /proc/sys/user/max_inotify_instances")
    flags = ["-U", "-r"]
    if tmpfs is not None:
        flags.append("-m")
        steps.append(f"mount -t tmpfs -o size={int(tmpfs_kib)}k,mode=0700 sidecar-state '{tmpfs}'")
    script = " && ".join([*steps, 'exec "$@"'])
    return ["unshare", *flags, "sh", "-c", script, "sh"]


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set size so far (``VmHWM`` in ``/proc/<pid>/status``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


# -- the daemon's views ----------------------------------------------------------------------------------------


def http_port(proc: DaemonProcess) -> int:
    started = wait_until(lambda: proc.events("http_started"), timeout=15, message=proc.output)
    return int(started[0]["port"])


def get_json(proc: DaemonProcess, path: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of a GET on the daemon's port (503 bodies included)."""
    url = f"http://127.0.0.1:{http_port(proc)}{path}"
    try:
        with _OPENER.open(url, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def status(proc: DaemonProcess) -> dict[str, Any]:
    return get_json(proc, "/status")[1]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proc: DaemonProcess) -> Samples:
    """Every sample of the daemon's ``/metrics`` as ``{(name, labels): value}``."""
    with _OPENER.open(f"http://127.0.0.1:{http_port(proc)}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


def states(rows: Mapping[str, Row]) -> Counter[str]:
    return Counter(row.state for row in rows.values())


# -- figures for docs/RELIABILITY.md ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What a scenario did: the columns of the RELIABILITY.md table."""

    scenario: str
    files_written: int = 0
    in_bucket_identical: int = 0
    missing: int = 0
    torn_or_foreign: int = 0  # objects whose bytes are no complete version of any file written
    duplicate_puts: int = 0  # PutObject/Complete that reached the store beyond one per key (412s included)
    variant_objects: int = 0  # extra keys holding a version of a file already in the bucket
    errors_reported: int = 0  # error/warning log lines and failed/retry outcomes the operator can see
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> Tally:
        """Append this tally as a JSON line to ``$SIDECAR_RELIABILITY_FIGURES`` (if set)."""
        target = os.environ.get(FIGURES_ENV)
        if target:
            with open(target, "a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(self), default=str) + "\n")
        return self


ERROR_EVENTS = (
    "upload_retry_scheduled", "upload_failed", "upload_skipped", "watcher_overflow", "watcher_degraded",
    "journal_write_failed", "journal_read_failed", "settle_loop_failed", "maintenance_failed",
    "multipart_orphan_aborted", "candidate_skipped", "file_skipped", "watcher_incomplete", "journal_recovered",
)


def errors_reported(procs: Iterable[DaemonProcess]) -> int:
    """Log lines at warning or above, plus the named error events at any level, over all runs."""
    total = 0
    for proc in procs:
        for line in proc.log_lines():
            if line.get("level") in ("warning", "error", "critical") or line.get("event") in ERROR_EVENTS:
                total += 1
    return total


# -- one scenario's rig -----------------------------------------------------------------------------------------


class Rig:
    """The moving parts of one scenario.

    moto (read directly), the endpoint the daemon talks to (the strict https proxy, or any URL), one bucket,
    a watched folder ``out/`` and a state folder ``state/`` under ``base``, every version of every file the
    test wrote (``versions``; the last one is what must end up in the bucket), and every daemon started.
    """

    def __init__(
        self, base: Path, s3: S3Server, bucket: str, *, proxy: R2Proxy | None = None, endpoint: str | None = None,
        ca_bundle: str | None = None, **extra: str | float,
    ) -> None:
        self.base = base
        self.s3 = s3
        self.bucket = bucket
        self.proxy = proxy
        self.out = base / "out"
        self.state = base / "state"
        self.out.mkdir(parents=True, exist_ok=True)
        url = endpoint or (proxy.endpoint if proxy is not None else s3.endpoint)
        bundle = ca_bundle if ca_bundle is not None else (proxy.ca_bundle if proxy is not None else None)
        settings: dict[str, str | float] = {"RUNPOD_POD_ID": POD_ID, "settle_s": 0.05, "retry_base_s": 0.2,
                                            "retry_cap_s": 1.0}
        settings.update(extra)
        self.env = sidecar_env(base, url, bucket, ca_bundle=bundle, **settings)
        self.versions: dict[str, list[bytes]] = {}
        self.procs: list[DaemonProcess] = []

    # -- processes

    def process(self, *, prefix: Sequence[str] = (), user: int | None = None, umask: int = -1,
                args: Sequence[str] = ("run",), **env: str | float) -> PrefixedDaemon:
        merged = dict(self.env)
        merged.update((env_name(name), str(value)) for name, value in env.items())
        log_dir = self.base / "logs" / f"{len(self.procs):03d}"
        proc = PrefixedDaemon(merged, args, prefix=prefix, user=user, umask=umask, log_dir=log_dir)
        self.procs.append(proc)
        return proc

    def start(self, *, wait: bool = True, **kw: Any) -> PrefixedDaemon:
        """Start ``sidecar run`` and (by default) wait for ``daemon_started``."""
        proc = self.process(**kw).start()
        if wait:
            wait_until(lambda: proc.events("daemon_started") or not proc.is_running(), timeout=20,
                       message=proc.output)
            assert proc.is_running(), proc.output()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_running():
                with contextlib.suppress(OSError):
                    os.kill(proc.pid or 0, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            proc.stop()
        with contextlib.suppress(Exception):  # best effort: the bucket fixture cleans up after us anyway
            self.empty_bucket()

    def output(self) -> str:
        return "\n".join(p.output()[-3000:] for p in self.procs[-2:])

    # -- files

    def path(self, rel: str) -> Path:
        return self.out / rel

    def write(self, rel: str, data: bytes) -> str:
        """Write ``rel`` in one go (creating folders) and remember this version as its final one."""
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.remember(rel, data)

    def remember(self, rel: str, data: bytes) -> str:
        self.versions.setdefault(rel, []).append(data)
        return rel

    def forget(self, rel: str) -> None:
        self.versions.pop(rel, None)

    @staticmethod
    def key(rel: str) -> str:
        """The object key of ``rel`` under the default template ``{pod_id}/{relpath}``."""
        return f"{POD_ID}/{path_text(os.fsencode(rel))}"

    def expected(self, rels: Iterable[str] | None = None) -> dict[str, bytes]:
        chosen = self.versions if rels is None else {rel: self.versions[rel] for rel in rels}
        return {self.key(rel): v[-1] for rel, v in chosen.items()}

    # -- the bucket

    def keys(self) -> set[str]:
        return set(self.s3.keys(self.bucket))

    def objects(self) -> dict[str, bytes]:
        """Every object of the bucket, fetched straight from moto (8 GETs at a time)."""
        client = self.s3.direct

        def get(key: str) -> tuple[str, bytes]:
            return key, client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(get, sorted(self.keys())))

    def wait_in_bucket(self, rels: Iterable[str], timeout: float = 40) -> None:
        """Wait until the key of every one of ``rels`` was written (bytes are checked by the audit).

        With a proxy this reads the proxy's record, never moto: moto 5 computes an object's ETag lazily and
        without its lock, so a LIST racing the PUT of the same key can cache a wrong ETag (seen once here: a
        spurious ETagMismatch for the daemon and a "torn" object for the audit, with correct bytes).
        """
        wanted = {self.key(rel) for rel in rels}

        def written() -> set[str]:
            if self.proxy is None:
                return self.keys()
            return {r.key or "" for r in self.proxy.requests
                    if r.operation in ("PutObject", "CompleteMultipartUpload") and r.status in (200, 412)}

        def missing() -> list[str]:
            return sorted(wanted - written())

        wait_until(lambda: not missing(), timeout=timeout, interval=0.1,
                   message=lambda: f"missing {missing()[:5]}\n{self.output()}")

    def empty_bucket(self) -> None:
        """Delete every object in batches of 1,000 (the bucket fixture deletes them one by one)."""
        keys = sorted(self.keys())
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.s3.direct.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def wait_idle(self, proc: DaemonProcess, timeout: float = 40) -> dict[str, Any]:
        """Wait until nothing is settling, pending, uploading or in flight; returns that /status."""

        def idle() -> dict[str, Any] | None:
            doc = status(proc)
            counts = doc["counts"]
            busy = counts["pending"]["files"] + counts["uploading"]["files"] + doc["inflight"] + doc["settling"]
            return doc if busy == 0 and doc.get("last_scan") else None

        return wait_until(idle, timeout=timeout, interval=0.1, message=proc.output)

    def journal(self) -> dict[str, Row]:
        return journal_rows(self.state / "journal.sqlite3")

    # -- the audit

    def digests(self, expected: Mapping[str, set[str]] | None = None) -> dict[str, str]:
        """``{key: MD5 hex}`` of every object. moto's ETag from one LIST where it is what ``expected`` says
        (cheap where fetching thousands of bodies is not); otherwise, and for multipart objects (whose ETag is
        no MD5), the body is fetched and hashed, because moto's ETag cache can be wrong (see wait_in_bucket)."""
        out: dict[str, str] = {}
        for page in self.s3.direct.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                etag = obj["ETag"].strip('"')
                if "-" in etag or expected is None or etag not in expected.get(obj["Key"], set()):
                    body = self.s3.direct.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                    etag = hashlib.md5(body).hexdigest()
                out[obj["Key"]] = etag
        return out

    def audit(self, scenario: str, *, expect_all: bool = True, **extra: Any) -> Tally:
        """Compare the bucket with what was written; count duplicates and reported errors; record the figures.

        Asserts the invariants every scenario shares: no object holds bytes that are not a complete version
        of a file, every file's final version is in the bucket (unless ``expect_all`` is False), and no key
        holds something other than a version of its own file. Bytes are compared by MD5.
        """
        md5 = {rel: [hashlib.md5(data).hexdigest() for data in v] for rel, v in self.versions.items()}
        objs = self.digests({self.key(rel): set(v) for rel, v in md5.items()})
        finals = {self.key(rel): v[-1] for rel, v in md5.items()}
        all_versions = {digest for v in md5.values() for digest in v}
        tally = Tally(scenario, files_written=len(self.versions), extra=dict(extra))
        tally.in_bucket_identical = sum(1 for key, digest in finals.items() if objs.get(key) == digest)
        present = set(objs.values())
        tally.missing = sum(1 for key, digest in finals.items() if objs.get(key) != digest and digest not in present)
        tally.torn_or_foreign = sum(1 for digest in objs.values() if digest not in all_versions)
        tally.variant_objects = sum(1 for key in objs if key not in finals)
        if self.proxy is not None:
            writes = Counter(r.key for r in self.proxy.requests  # those that reached the store (or its 412 check)
                             if r.operation in ("PutObject", "CompleteMultipartUpload")
                             and r.origin in ("upstream", "rule"))
            tally.duplicate_puts = sum(n - 1 for n in writes.values() if n > 1)
        tally.errors_reported = errors_reported(self.procs)
        tally.record()
        assert tally.torn_or_foreign == 0, f"objects that are no complete version of any file: {tally}"
        by_key = {self.key(rel): v for rel, v in md5.items()}
        for key, digest in objs.items():
            assert key not in by_key or digest in by_key[key], f"{key} holds bytes of another file"
        if expect_all:
            assert tally.missing == 0, f"{tally.missing} file(s) missing from the bucket: {tally}"
        return tally


def env_name(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith(("SIDECAR_", "AWS_", "RUNPOD_")) else f"SIDECAR_{upper}"


def accepted_puts(proxy: R2Proxy) -> Counter[str]:
    """PutObject requests answered 200, by key."""
    return Counter(r.key or "" for r in proxy.puts() if r.status == 200)


def requests_for(proxy: R2Proxy, key: str) -> list[RecordedRequest]:
    return [r for r in proxy.requests if r.key == key]


def world_readable_dir(prefix: str) -> Path:
    """A fresh folder outside pytest's 0700 tmp tree, for daemons that run as another user."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# -- the sink: an S3 endpoint that checks multipart rules and keeps no bytes -------------------------------------


@dataclass
class SinkUpload:
    """One multipart upload as the sink saw it."""

    key: str
    metadata: dict[str, str]
    parts: dict[int, tuple[int, str]] = field(default_factory=dict)  # number -> (size, md5 hex)
    digest: Any = field(default_factory=hashlib.md5)  # MD5 of the parts, fed in order
    next_part: int = 1
    early: dict[int, list[bytes]] = field(default_factory=dict)  # parts that came before their predecessor
    in_order: bool = True  # False once more parts were early at once than MAX_EARLY allows
    completed: bool = False
    aborted: bool = False


@dataclass
class SinkObject:
    key: str
    size: int
    md5: str  # MD5 of the whole content as the sink received it
    etag: str
    metadata: dict[str, str]
    parts: int = 0
    part_size: int = 0


class S3Sink:
    """A minimal S3 endpoint for huge uploads: validates Content-MD5 of every body, multipart part sizes
    (equal non-final parts, >= 5 MiB, <= 10,000 parts) and ``If-None-Match: *``, hashes the bytes in order
    and throws them away. Bodies are read in 1 MiB pieces, so the sink's memory stays flat."""

    MIN_PART = 5 * MIB
    MAX_PARTS = 10_000
    MAX_EARLY = 32  # parts held for ordering at once; more means the client does not bound its parts in flight

    def __init__(self) -> None:
        self.objects: dict[str, SinkObject] = {}
        self.uploads: dict[str, SinkUpload] = {}
        self.errors: list[tuple[str, str, str]] = []  # (operation, key, code) of every refusal
        self.requests: list[tuple[str, str, int]] = []  # (operation, key, status)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> S3Sink:
        sink = self

        class Handler(_SinkHandler):
            owner = sink

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> S3Sink:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _xml(tag: str, **children: str) -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in children.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{tag} xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"{inner}</{tag}>").encode()


class _SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: S3Sink

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _target(self) -> tuple[str, dict[str, str]]:
        split = urllib.parse.urlsplit(self.path)
        parts = urllib.parse.unquote(split.path).lstrip("/").split("/", 1)
        key = parts[1] if len(parts) == 2 else ""
        query = {k: v[0] for k, v in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()}
        return key, query

    def _metadata(self) -> dict[str, str]:
        return {k.lower()[len("x-amz-meta-"):]: v for k, v in self.headers.items()
                if k.lower().startswith("x-amz-meta-")}

    def _answer(self, op: str, key: str, status: int, body: bytes = b"", *, headers: dict[str, str] | None = None,
                code: str = "") -> None:
        with self.owner.lock:
            self.owner.requests.append((op, key, status))
            if code:
                self.owner.errors.append((op, key, code))
        if code:
            body = _xml("Error", Code=code, Message=code) if self.command != "HEAD" else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else
                         (headers or {}).get("Content-Length", "0"))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _stream_body(self, feed: Callable[[bytes], None] | None = None) -> tuple[int, str]:
        """Read the body in 1 MiB pieces; (length, md5 hex). ``feed`` sees every piece."""
        remaining = int(self.headers.get("Content-Length") or 0)
        digest = hashlib.md5()
        total = 0
        while remaining:
            chunk = self.rfile.read(min(remaining, MIB))
            if not chunk:
                break
            digest.update(chunk)
            if feed is not None:
                feed(chunk)
            total += len(chunk)
            remaining -= len(chunk)
        return total, digest.hexdigest()

    def _md5_ok(self, md5_hex: str) -> bool:
        header = self.headers.get("Content-MD5")
        return header is None or base64.b64decode(header) == bytes.fromhex(md5_hex)

    def do_HEAD(self) -> None:
        key, _ = self._target()
        if not key:
            self._answer("HeadBucket", "", 200)
            return
        with self.owner.lock:
            obj = self.owner.objects.get(key)
        if obj is None:
            self._answer("HeadObject", key, 404)
            return
        headers = {"ETag": f'"{obj.etag}"', "Content-Length": str(obj.size)}
        headers.update({f"x-amz-meta-{k}": v for k, v in obj.metadata.items()})
        self._answer("HeadObject", key, 200, headers=headers)

    def do_POST(self) -> None:
        key, query = self._target()
        if "uploads" in query:
            self._stream_body()
            upload_id = uuid.uuid4().hex
            with self.owner.lock:
                self.owner.uploads[upload_id] = SinkUpload(key, self._metadata())
            self._answer("CreateMultipartUpload", key, 200,
                         _xml("InitiateMultipartUploadResult", Bucket="b", Key=key, UploadId=upload_id))
            return
        self._complete(key, query.get("uploadId", ""))

    def _complete(self, key: str, upload_id: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        root = ET.fromstring(self.rfile.read(length))
        numbers = [int(el.text or 0) for el in root.iter() if el.tag.endswith("PartNumber")]
        with self.owner.lock:
            upload = self.owner.uploads.get(upload_id)
        code = ""
        if upload is None or upload.aborted:
            code = "NoSuchUpload"
        elif numbers != list(range(1, len(numbers) + 1)) or any(n not in upload.parts for n in numbers):
            code = "InvalidPart"
        elif len(numbers) > S3Sink.MAX_PARTS:
            code = "InvalidArgument"
        else:
            sizes = [upload.parts[n][0] for n in numbers]
            if any(size < S3Sink.MIN_PART for size in sizes[:-1]):
                code = "EntityTooSmall"
            elif len(set(sizes[:-1])) > 1 or (len(sizes) > 1 and sizes[-1] > sizes[0]):
                code = "InvalidPart"
            elif not upload.in_order:
                code = "SinkNeedsPartsInOrder"
        if code:
            self._answer("CompleteMultipartUpload", key, 400, code=code)
            return
        assert upload is not None
        md5s = b"".join(bytes.fromhex(upload.parts[n][1]) for n in numbers)
        etag = f"{hashlib.md5(md5s).hexdigest()}-{len(numbers)}"
        obj = SinkObject(key, sum(upload.parts[n][0] for n in numbers), upload.digest.hexdigest(), etag,
                         upload.metadata, parts=len(numbers), part_size=upload.parts[1][0])
        with self.owner.lock:
            upload.completed = True
            self.owner.objects[key] = obj
        self._answer("CompleteMultipartUpload", key, 200,
                     _xml("CompleteMultipartUploadResult", Bucket="b", Key=key, ETag=f'"{etag}"'))

    def do_PUT(self) -> None:
        key, query = self._target()
        if "uploadId" in query:
            self._upload_part(key, query["uploadId"], int(query.get("partNumber", "0")))
            return
        with self.owner.lock:
            exists = key in self.owner.objects
        if exists and self.headers.get("If-None-Match", "").strip() == "*":
            self._stream_body()
            self._answer("PutObject", key, 412, code="PreconditionFailed")
            return
        size, md5 = self._stream_body()
        if not self._md5_ok(md5):
            self._answer("PutObject", key, 400, code="BadDigest")
            return
        with self.owner.lock:
            self.owner.objects[key] = SinkObject(key, size, md5, md5, self._metadata())
        self._answer("PutObject", key, 200, headers={"ETag": f'"{md5}"'})

    def _upload_part(self, key: str, upload_id: str, number: int) -> None:
        with self.owner.lock:
            upload = self.owner.uploads.get(upload_id)
        if upload is None:
            self._stream_body()
            self._answer("UploadPart", key, 404, code="NoSuchUpload")
            return
        pieces: list[bytes] = []
        size, md5 = self._stream_body(pieces.append)
        if not self._md5_ok(md5):
            self._answer("UploadPart", key, 400, code="BadDigest")
            return
        with self.owner.lock:
            upload.parts[number] = (size, md5)
            # Parts sent in parallel arrive out of order: hold the early ones (at most the daemon's parts in
            # flight, each <= its part size) and feed the digest in part order.
            if number > upload.next_part:
                upload.early[number] = pieces
                upload.in_order = upload.in_order and len(upload.early) <= S3Sink.MAX_EARLY
            elif number == upload.next_part:
                upload.early[number] = pieces
                while upload.next_part in upload.early:
                    for piece in upload.early.pop(upload.next_part):
                        upload.digest.update(piece)
                    upload.next_part += 1
        self._answer("UploadPart", key, 200, headers={"ETag": f'"{md5}"'})

    def do_DELETE(self) -> None:
        key, query = self._target()
        with self.owner.lock:
            upload = self.owner.uploads.get(query.get("uploadId", ""))
            if upload is not None:
                upload.aborted = True
        self._answer("AbortMultipartUpload", key, 204)

    def do_GET(self) -> None:
        key, _ = self._target()
        self._answer("GetObject", key, 501, code="NotImplemented")
