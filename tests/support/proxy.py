"""R2Proxy: a recording, R2-strict, fault-injecting HTTP/1.1 proxy in front of the moto S3 server.

Every client request is read in full, recorded, then (in this order) delayed, faulted, checked against
the R2 rules (FIELD-NOTES §3) and finally forwarded to the upstream server over a keep-alive
``http.client`` connection. Errors the proxy makes up itself are S3-style XML documents.

Assumes path-style addressing (``/bucket/key``), which is what botocore uses for an IP endpoint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import re
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from xml.sax.saxutils import escape

import boto3
from botocore.config import Config

from . import sigv4
from .s3server import DUMMY_KEY_ID, DUMMY_SECRET, REGION
from .tls import TlsFiles

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

Status = int | Literal["reset", "hang"]
Origin = Literal["upstream", "fault", "rule", "proxy"]
Predicate = Callable[["RecordedRequest"], bool]

_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length",
    }
)
_FAKE_AUTH = (
    "AWS4-HMAC-SHA256 Credential=testing/20200101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00"
)
_CODE_RE = re.compile(rb"<Code>([^<]*)</Code>")
_OBJECT_SUBRESOURCES = ("tagging", "acl", "retention", "legal-hold", "attributes", "restore", "torrent")


def r2_safe_config(total_attempts: int = 1, **overrides: Any) -> Config:
    """The botocore config that works with R2: checksums only when required; no retries by default.

    ``total_attempts`` counts the first try (botocore's ``retries.max_attempts`` counts only retries).
    """
    params: dict[str, Any] = {
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "retries": {"total_max_attempts": total_attempts, "mode": "standard"},
        "connect_timeout": 2,
        "read_timeout": 10,
        "s3": {"addressing_style": "path"},
    }
    params.update(overrides)
    return Config(**params)


def content_md5(data: bytes) -> str:
    """The base64 MD5 that goes into a ``Content-MD5`` header / ``ContentMD5=`` argument."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


@dataclass
class RecordedRequest:
    """One client request as the proxy saw it, and what it was answered."""

    method: str
    path: str  # unquoted, without the query: "/bucket/some key.png"
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names; Authorization is dropped
    body_len: int  # bytes on the wire after HTTP de-chunking (aws-chunked framing included)
    payload_len: int  # decoded payload (aws-chunked framing removed)
    timestamp: float = field(default_factory=time.time)  # wall clock when the request was read
    started: float = field(default_factory=time.monotonic, repr=False)
    duration: float | None = None  # seconds from reading the request to deciding the answer
    status: Status | None = None
    error_code: str | None = None
    origin: Origin | None = None  # who produced the answer

    @property
    def bucket(self) -> str | None:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[0] or None

    @property
    def key(self) -> str | None:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) == 2 and parts[1] else None

    @property
    def upload_id(self) -> str | None:
        return self.query.get("uploadId")

    @property
    def part_number(self) -> int | None:
        value = self.query.get("partNumber")
        return int(value) if value and value.isdigit() else None

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300

    @property
    def operation(self) -> str:
        """Best-effort S3 operation name (``PutObject``, ``UploadPart``, ``ListObjectsV2``, ...)."""
        return _operation(self.method, self.bucket, self.key, self.query, self.headers)


def _operation(
    method: str, bucket: str | None, key: str | None, query: dict[str, str], headers: dict[str, str]
) -> str:
    if bucket is None:
        return "ListBuckets" if method == "GET" else f"{method}Root"
    if key is None:
        return _bucket_operation(method, query)
    copy = "x-amz-copy-source" in headers
    if "uploadId" in query:
        by_method = {
            "PUT": "UploadPartCopy" if copy else "UploadPart",
            "POST": "CompleteMultipartUpload",
            "DELETE": "AbortMultipartUpload",
            "GET": "ListParts",
        }
        return by_method.get(method, f"{method}Multipart")
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    for sub in _OBJECT_SUBRESOURCES:
        if sub in query:
            verb = {"GET": "Get", "PUT": "Put", "DELETE": "Delete", "POST": "Post"}.get(method, method)
            return f"{verb}Object{sub.title().replace('-', '')}"
    plain = {
        "PUT": "CopyObject" if copy else "PutObject",
        "GET": "GetObject",
        "HEAD": "HeadObject",
        "DELETE": "DeleteObject",
    }
    return plain.get(method, f"{method}Object")


def _bucket_operation(method: str, query: dict[str, str]) -> str:
    bucket_ops = {
        ("GET", "list-type"): "ListObjectsV2",
        ("GET", "uploads"): "ListMultipartUploads",
        ("GET", "location"): "GetBucketLocation",
        ("GET", "versions"): "ListObjectVersions",
        ("POST", "delete"): "DeleteObjects",
    }
    for (verb, sub), name in bucket_ops.items():
        if method == verb and sub in query:
            return name
    plain = {"GET": "ListObjects", "PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}
    return plain.get(method, f"{method}Bucket")


@dataclass
class R2Rules:
    """Which R2 strictness rules the proxy enforces; mutable at runtime."""

    reject_aws_chunked: bool = True  # Content-Encoding aws-chunked / STREAMING-* sha256 / x-amz-trailer
    reject_crc64nvme: bool = True  # x-amz-checksum-crc64nvme header
    reject_empty_storage_class: bool = True  # x-amz-storage-class present but empty
    reject_tagging: bool = True  # x-amz-tagging header
    max_metadata_bytes: int | None = 8192  # 400 MetadataTooLarge above this (x-amz-meta-* names + values)
    # R2 storage classes; another value gets 400 InvalidStorageClass
    storage_classes: tuple[str, ...] | None = ("STANDARD", "STANDARD_IA")
    max_key_bytes: int | None = 1024  # InvalidObjectName above this (utf-8 bytes)
    verify_content_md5: bool = True  # BadDigest / InvalidDigest
    enforce_if_none_match: bool = True  # 412 for PUT If-None-Match: * on an existing key
    # 400 UnconditionalWrite for a PutObject / CompleteMultipartUpload without If-None-Match: * (R2 would
    # overwrite; the sidecar must never send one)
    require_conditional_writes: bool = True
    equal_part_sizes: bool = True  # InvalidPart at completion when non-final parts differ in size
    min_part_size: int = 0  # EntityTooSmall at completion for a non-final part below this; 0 = off
    signing_secret: str | None = DUMMY_SECRET  # 403 SignatureDoesNotMatch if signed otherwise; None = off

    @classmethod
    def off(cls) -> R2Rules:
        return cls(
            reject_aws_chunked=False, reject_crc64nvme=False, reject_empty_storage_class=False,
            reject_tagging=False, max_key_bytes=None, verify_content_md5=False, max_metadata_bytes=None,
            storage_classes=None,
            enforce_if_none_match=False, equal_part_sizes=False, min_part_size=0, signing_secret=None,
            require_conditional_writes=False,
        )


@dataclass
class _Fault:
    kind: Literal["fail", "reset", "hang", "no_etag"]
    remaining: int | None  # None: until healed
    status: int = 503
    code: str = "SlowDown"
    message: str = "Injected fault"
    when: Predicate | None = None
    release: threading.Event = field(default_factory=threading.Event)
    forward: bool = False  # no_etag: pass the request on (the store keeps it) or not (a lie)
    etag: str = ""  # no_etag with forward: the ETag answered instead of the store's ("" for none)


@dataclass
class _Rejection:
    status: int
    code: str
    message: str


def error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
    ).encode()


def decode_aws_chunked(raw: bytes) -> bytes | None:
    """Payload of an ``aws-chunked`` body (``hex[;ext]\\r\\n data \\r\\n ... 0\\r\\n trailers``)."""
    out = bytearray()
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(raw[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            return None
        pos = eol + 2
        if size == 0:
            return bytes(out)
        out += raw[pos : pos + size]
        pos += size + 2


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    proxy: R2Proxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets, refused handshakes and connections cut by down() are expected here.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _upstream_conn: http.client.HTTPConnection | None = None

    # -- connection lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        ctx = self.server.proxy._ssl_context
        if ctx is not None:
            self.request = ctx.wrap_socket(self.request, server_side=True)
        super().setup()
        self.server.proxy._register(self.connection)

    def finish(self) -> None:
        self.server.proxy._unregister(self.connection)
        with contextlib.suppress(OSError):
            super().finish()
        if isinstance(self.connection, ssl.SSLSocket):
            # wrap_socket() detached the raw socket the server will try to close: close ours.
            with contextlib.suppress(OSError):
                self.connection.close()
        if self._upstream_conn is not None:
            self._upstream_conn.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    # -- request handling -----------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:  # noqa: PLR0911 - one early return per way a request can end
        proxy = self.server.proxy
        body = self._read_body()
        split = urllib.parse.urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
        payload = body
        if "aws-chunked" in headers.get("content-encoding", "").lower():
            payload = decode_aws_chunked(body) or b""
        rec = RecordedRequest(
            method=self.command,
            path=urllib.parse.unquote(split.path),
            query={k: v[0] for k, v in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()},
            headers=headers,
            body_len=len(body),
            payload_len=len(payload),
        )

        proxy._apply_delay(rec)
        fault = proxy._take_fault(rec)
        if fault is not None:
            if fault.kind == "reset":
                proxy._record(rec, "reset", None, "fault")
                self._reset_connection()
                return
            if fault.kind == "hang":
                proxy._record(rec, "hang", None, "fault")
                fault.release.wait()
                self.close_connection = True
                return
            if fault.kind == "no_etag":
                self._answer_without_etag(rec, split, body, forward=fault.forward, etag=fault.etag)
                return
            self._reply_error(rec, _Rejection(fault.status, fault.code, fault.message), "fault")
            return

        rejection = proxy._check_signature(self.command, self.path, self.headers.items(), body)
        rejection = rejection or proxy._check_rules(rec, payload)
        if rejection is not None:
            self._reply_error(rec, rejection, "rule")
            return

        lock = proxy._conditional_lock(rec)
        with lock or contextlib.nullcontext():
            if lock is not None and proxy._upstream_exists(rec.path):
                rejection = _Rejection(
                    412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold"
                )
                self._reply_error(rec, rejection, "rule")
                return
            try:
                status, resp_headers, resp_body = self._forward(split, body)
            except (OSError, http.client.HTTPException) as exc:
                self._reply_error(rec, _Rejection(502, "BadGateway", f"upstream: {exc!r}"), "proxy")
                return
        code = None
        if status >= 400:
            match = _CODE_RE.search(resp_body)
            code = match.group(1).decode(errors="replace") if match else None
        proxy._after_upstream(rec, status, payload)
        proxy._record(rec, status, code, "upstream")
        self._send(status, resp_headers, resp_body)

    def _answer_without_etag(self, rec: RecordedRequest, split: urllib.parse.SplitResult, body: bytes, *,
                             forward: bool, etag: str = "") -> None:
        """200 without an ETag (or with ``etag`` instead of the store's): after passing the request on
        (``forward``), or instead of it (a lie)."""
        status, headers, data = 200, [("Date", self.date_time_string())], b""
        if forward:
            status, headers, data = self._forward(split, body)
            headers = [(k, v) for k, v in headers if k.lower() != "etag"]
            data = re.sub(rb"<ETag>[^<]*</ETag>", f"<ETag>&quot;{etag}&quot;</ETag>".encode() if etag else b"", data)
            if etag and b"<ETag>" not in data:
                headers.append(("ETag", f'"{etag}"'))
        self.server.proxy._record(rec, status, None, "fault")
        self._send(status, headers, data)

    def _forward(
        self, split: urllib.parse.SplitResult, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        target = urllib.parse.urlunsplit(("", "", split.path, split.query, ""))
        for attempt in range(2):
            reused = self._upstream_conn is not None
            if self._upstream_conn is None:
                self._upstream_conn = self.server.proxy._upstream_connection()
            conn = self._upstream_conn
            try:
                conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        conn.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                conn.close()
                self._upstream_conn = None
                if reused and attempt == 0:
                    continue  # a stale keep-alive connection: the upstream never saw this request
                raise
            if resp.will_close:
                conn.close()
                self._upstream_conn = None
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD" and resp.getheader("Content-Length") is not None:
                out_headers.append(("Content-Length", resp.getheader("Content-Length", "0")))
            return resp.status, out_headers, data
        raise AssertionError("unreachable")

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        has_body = self.command != "HEAD" and status not in (204, 304)
        if has_body:
            self.send_header("Content-Length", str(len(body)))
        elif self.command == "HEAD" and not any(name.lower() == "content-length" for name, _ in headers):
            self.send_header("Content-Length", "0")
        self.end_headers()
        if has_body:
            self.wfile.write(body)
        self.wfile.flush()

    def _reply_error(self, rec: RecordedRequest, rejection: _Rejection, origin: Origin) -> None:
        self.server.proxy._record(rec, rejection.status, rejection.code, origin)
        body = b"" if self.command == "HEAD" else error_xml(rejection.code, rejection.message)
        self._send(
            rejection.status,
            [("Content-Type", "application/xml"), ("Date", self.date_time_string())],
            body,
        )

    def _reset_connection(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0) without answering."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            sock.close()  # the last reference to the descriptor: the kernel sends RST, not FIN


class R2Proxy:
    """A strict, recording, fault-injecting stand-in for Cloudflare R2 in front of ``upstream``.

    ``strict=True`` enables every rule of :class:`R2Rules`; pass ``rules=`` to choose, or change
    ``proxy.rules.<name>`` at runtime. With ``tls`` the proxy speaks https (botocore only uses
    aws-chunked trailers over https); clients must trust ``tls.ca_bundle`` (``proxy.ca_bundle``).
    """

    def __init__(
        self,
        upstream: str,
        *,
        strict: bool = True,
        rules: R2Rules | None = None,
        tls: TlsFiles | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or parsed.hostname is None or parsed.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream
        self._upstream_addr = (parsed.hostname, parsed.port)
        self.rules = rules if rules is not None else (R2Rules() if strict else R2Rules.off())
        self.tls = tls
        self.host = host
        self.port = port
        self._ssl_context: ssl.SSLContext | None = None
        if tls is not None:
            self._ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl_context.load_cert_chain(tls.cert_chain, tls.key)

        self._lock = threading.RLock()  # reentrant: a fault's ``when`` predicate may call count()
        self._lifecycle = threading.RLock()
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._delay: tuple[float, Predicate | None] = (0.0, None)
        self._delay_cancel = threading.Event()
        self._part_sizes: dict[str, dict[int, int]] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._accept_thread: threading.Thread | None = None
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def ca_bundle(self) -> str | None:
        """Path of the CA to trust (``verify=`` / ``AWS_CA_BUNDLE``), None for plain http."""
        return str(self.tls.ca_bundle) if self.tls is not None else None

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def start(self) -> R2Proxy:
        with self._lifecycle:
            self._started = True
            self._listen()
        return self

    def stop(self) -> None:
        with self._lifecycle:
            self._started = False
            self._release_faults()
            self._delay_cancel.set()
            self.down()

    def down(self) -> None:
        """Outage: close the listening socket (new connections are refused) and cut open connections."""
        with self._lifecycle:
            server, thread = self._server, self._accept_thread
            self._server, self._accept_thread = None, None
            if server is not None:
                with contextlib.suppress(OSError):
                    server.socket.shutdown(socket.SHUT_RDWR)  # wakes accept() at once
                server.socket.close()
            if thread is not None:
                thread.join(timeout=5)
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        """End an outage: listen again on the same port."""
        with self._lifecycle:
            if self._server is None and self._started:
                self._listen()

    def _listen(self) -> None:
        if self._server is not None:
            return
        server = _Server((self.host, self.port), _Handler, bind_and_activate=False)
        server.proxy = self
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.server_bind()
            server.server_activate()
        except OSError:
            server.server_close()
            raise
        self.port = server.server_address[1]
        self._server = server
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(server,), name=f"r2proxy-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()

    @staticmethod
    def _accept_loop(server: _Server) -> None:
        while True:
            try:
                conn, addr = server.socket.accept()
            except OSError:
                return
            server.process_request(conn, addr)

    def _register(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def _unregister(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def __enter__(self) -> R2Proxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------------------
    def client(self, config: Config | None = None) -> S3Client:
        """A boto3 client through the proxy; ``config=None`` means :func:`r2_safe_config`."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=DUMMY_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET,
            region_name=REGION,
            config=config if config is not None else r2_safe_config(),
            verify=self.ca_bundle if self.ca_bundle is not None else True,
        )

    # -- recording ------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every recorded client request, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def select(
        self, method: str | None = None, predicate: Predicate | None = None, operation: str | None = None
    ) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (operation is None or r.operation == operation)
            and (predicate is None or predicate(r))
        ]

    def count(
        self, method: str | None = None, predicate: Predicate | None = None, operation: str | None = None
    ) -> int:
        return len(self.select(method, predicate, operation))

    def puts(self) -> list[RecordedRequest]:
        """PutObject requests (PUT on a key, not UploadPart / CopyObject / subresources)."""
        return self.select(operation="PutObject")

    def parts(self) -> list[RecordedRequest]:
        return self.select(operation="UploadPart")

    def heads(self) -> list[RecordedRequest]:
        return self.select(operation="HeadObject")

    def gets(self) -> list[RecordedRequest]:
        return self.select(operation="GetObject")

    def lists(self) -> list[RecordedRequest]:
        """Every LIST (objects v1/v2, multipart uploads, parts, buckets): each is a Class A operation."""
        names = {"ListObjects", "ListObjectsV2", "ListMultipartUploads", "ListParts", "ListBuckets"}
        return [r for r in self.requests if r.operation in names]

    def _record(self, rec: RecordedRequest, status: Status, code: str | None, origin: Origin) -> None:
        rec.status, rec.error_code, rec.origin = status, code, origin
        rec.duration = time.monotonic() - rec.started
        with self._lock:
            self._requests.append(rec)

    # -- fault injection ------------------------------------------------------------------------------
    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "Injected fault",
        when: Predicate | None = None,
    ) -> None:
        """Answer the next ``n`` requests (matching ``when``) with an XML error instead of forwarding."""
        with self._lock:
            self._faults.append(_Fault("fail", n, status, code, message, when))

    def fail_all(
        self,
        status: int = 503,
        code: str = "ServiceUnavailable",
        message: str = "Injected fault",
        when: Predicate | None = None,
    ) -> None:
        """Answer every request (matching ``when``) with an XML error until :meth:`heal`."""
        with self._lock:
            self._faults.append(_Fault("fail", None, status, code, message, when))

    def reset_next(self, n: int = 1, when: Predicate | None = None) -> None:
        """Read the next ``n`` requests, then abort their connection with a TCP RST, no answer."""
        with self._lock:
            self._faults.append(_Fault("reset", n, when=when))

    def answer_without_etag(
        self, n: int | None = None, *, forward: bool = False, when: Predicate | None = None
    ) -> None:
        """Answer the next ``n`` (None: all, until :meth:`heal`) matching requests 200 without an ETag, having
        passed them on to the store (``forward``) or not (a store that claims to keep what it never got)."""
        with self._lock:
            self._faults.append(_Fault("no_etag", n, when=when, forward=forward))

    def answer_with_etag(self, etag: str, n: int | None = None, *, when: Predicate | None = None) -> None:
        """Pass the next ``n`` matching requests on, and answer with ``etag`` in place of the store's (a
        store whose multipart ETag is the whole object's MD5, as some S3-compatible servers answer)."""
        with self._lock:
            self._faults.append(_Fault("no_etag", n, when=when, forward=True, etag=etag))

    def hang(self, when: Predicate | None = None) -> None:
        """Read requests and never answer; on :meth:`heal` their connections are closed unanswered."""
        with self._lock:
            self._faults.append(_Fault("hang", None, when=when))

    def delay(self, seconds: float, when: Predicate | None = None) -> None:
        """Wait ``seconds`` before handling each request (matching ``when``); 0 turns it off."""
        with self._lock:
            self._delay = (seconds, when)
            if seconds <= 0:
                self._delay_cancel.set()
                self._delay_cancel = threading.Event()

    def heal(self) -> None:
        """Remove every fault and delay, release hung requests and end an outage (:meth:`up`)."""
        self._release_faults()
        self.delay(0)
        self.up()

    def _release_faults(self) -> None:
        with self._lock:
            faults, self._faults = self._faults, []
        for fault in faults:
            fault.release.set()

    def _apply_delay(self, rec: RecordedRequest) -> None:
        with self._lock:
            seconds, when = self._delay
            cancel = self._delay_cancel
        if seconds > 0 and (when is None or when(rec)):
            cancel.wait(seconds)

    def _take_fault(self, rec: RecordedRequest) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.when is not None and not fault.when(rec):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    # -- R2 rules -------------------------------------------------------------------------------------
    def _check_signature(
        self, method: str, raw_path: str, raw_headers: Iterable[tuple[str, str]], body: bytes
    ) -> _Rejection | None:
        secret = self.rules.signing_secret
        if secret is None:
            return None
        headers = {k.lower(): v for k, v in raw_headers}
        if "authorization" not in headers:
            return None  # hand-made unsigned requests of the proxy's own tests; clients always sign
        problem = sigv4.verify(method, raw_path, headers, body, secret)
        if problem is None:
            return None
        message = f"The request signature we calculated does not match ({problem})"
        return _Rejection(403, "SignatureDoesNotMatch", message)

    def _check_rules(self, rec: RecordedRequest, payload: bytes) -> _Rejection | None:
        """The first R2 rule this request breaks, in the order R2 would notice it."""
        for check in (self._check_conditional, self._check_headers, self._check_key, self._check_digest,
                      self._check_parts):
            rejection = check(rec, payload)
            if rejection is not None:
                return rejection
        return None

    def _check_conditional(self, rec: RecordedRequest, payload: bytes) -> _Rejection | None:
        if not self.rules.require_conditional_writes or rec.operation not in ("PutObject", "CompleteMultipartUpload"):
            return None
        if rec.headers.get("if-none-match", "").strip() == "*":
            return None
        return _Rejection(400, "UnconditionalWrite", f"test proxy: {rec.operation} without If-None-Match: *")

    def _check_headers(self, rec: RecordedRequest, payload: bytes) -> _Rejection | None:
        rules, h = self.rules, rec.headers
        if rules.reject_aws_chunked and (
            "aws-chunked" in h.get("content-encoding", "").lower()
            or h.get("x-amz-content-sha256", "").upper().startswith("STREAMING-")
            or "x-amz-trailer" in h
        ):
            return _Rejection(501, "NotImplemented", "aws-chunked uploads with trailers are not implemented")
        unsupported = None
        if rules.reject_crc64nvme and "x-amz-checksum-crc64nvme" in h:
            unsupported = "x-amz-checksum-crc64nvme"
        elif rules.reject_empty_storage_class and not h.get("x-amz-storage-class", "x").strip():
            unsupported = "x-amz-storage-class (empty)"
        elif rules.reject_tagging and "x-amz-tagging" in h:
            unsupported = "x-amz-tagging"
        if unsupported is not None:
            return _Rejection(501, "NotImplemented", f"Header {unsupported} is not implemented")
        meta = sum(len(k) - len("x-amz-meta-") + len(v) for k, v in h.items() if k.startswith("x-amz-meta-"))
        if rules.max_metadata_bytes is not None and meta > rules.max_metadata_bytes:
            return _Rejection(400, "MetadataTooLarge", f"Your metadata headers exceed the maximum allowed ({meta})")
        storage = h.get("x-amz-storage-class", "").strip()
        if rules.storage_classes is not None and storage and storage not in rules.storage_classes:
            return _Rejection(400, "InvalidStorageClass", "The storage class you specified is not valid")
        return None

    def _check_key(self, rec: RecordedRequest, payload: bytes) -> _Rejection | None:
        limit, key = self.rules.max_key_bytes, rec.key
        if limit is not None and key is not None and len(key.encode()) > limit:
            return _Rejection(400, "InvalidObjectName", "The specified object name is not valid.")
        return None

    def _check_digest(self, rec: RecordedRequest, payload: bytes) -> _Rejection | None:
        header = rec.headers.get("content-md5")
        if not self.rules.verify_content_md5 or header is None:
            return None
        try:
            expected = base64.b64decode(header, validate=True)
        except (binascii.Error, ValueError):
            expected = b""
        if len(expected) != 16:
            return _Rejection(400, "InvalidDigest", "The Content-MD5 you specified is not valid.")
        if expected != hashlib.md5(payload).digest():
            return _Rejection(400, "BadDigest", "The Content-MD5 you specified did not match the body.")
        return None

    def _check_parts(self, rec: RecordedRequest, payload: bytes) -> _Rejection | None:
        rules = self.rules
        if rec.operation != "CompleteMultipartUpload" or (
            not rules.equal_part_sizes and rules.min_part_size <= 0
        ):
            return None
        try:
            root = ET.fromstring(payload)
        except ET.ParseError:
            return None  # let the upstream answer MalformedXML
        numbers = sorted(int(el.text or 0) for el in root.iter() if el.tag.endswith("PartNumber"))
        with self._lock:
            sizes = dict(self._part_sizes.get(rec.upload_id or "", {}))
        if not numbers or any(n not in sizes for n in numbers):
            return None  # parts uploaded behind the proxy's back: nothing to judge
        non_final = [sizes[n] for n in numbers[:-1]]
        if rules.min_part_size > 0 and any(size < rules.min_part_size for size in non_final):
            return _Rejection(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum size.")
        if rules.equal_part_sizes and len(set(non_final)) > 1:
            return _Rejection(400, "InvalidPart", "All non-trailing parts must have the same length.")
        return None

    def _conditional_lock(self, rec: RecordedRequest) -> threading.Lock | None:
        """A per-key lock if this is a PUT with ``If-None-Match: *`` the proxy must enforce."""
        if not (
            self.rules.enforce_if_none_match
            and rec.method == "PUT"
            and rec.key is not None
            and rec.operation in ("PutObject", "CopyObject")
            and rec.headers.get("if-none-match", "").strip() == "*"
        ):
            return None
        with self._lock:
            return self._key_locks.setdefault(rec.path, threading.Lock())

    def _upstream_connection(self) -> http.client.HTTPConnection:
        host, port = self._upstream_addr
        return http.client.HTTPConnection(host, port, timeout=30)

    def _upstream_exists(self, path: str) -> bool:
        """Unrecorded HEAD to the upstream: does this key exist?"""
        conn = self._upstream_connection()
        try:
            # moto denies anonymous reads (403): any SigV4-shaped header will do, it checks no signature.
            conn.request("HEAD", urllib.parse.quote(path, safe="/~"), headers={"Authorization": _FAKE_AUTH})
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        finally:
            conn.close()

    def _after_upstream(self, rec: RecordedRequest, status: int, payload: bytes) -> None:
        op = rec.operation
        upload_id = rec.upload_id
        if upload_id is None or not 200 <= status < 300:
            return
        with self._lock:
            if op == "UploadPart" and rec.part_number is not None:
                self._part_sizes.setdefault(upload_id, {})[rec.part_number] = len(payload)
            elif op in ("CompleteMultipartUpload", "AbortMultipartUpload"):
                self._part_sizes.pop(upload_id, None)
