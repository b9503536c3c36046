"""PutObject without botocore's request machinery: the single-PUT path of every ordinary output.

botocore spends ~2 ms of CPU on a PutObject (parameter validation, serialisation, a dozen event hooks,
signing, urllib3), more than the MD5 and the send of a 200 KB image together, and more than rclone spends on
a whole file. This sends the same request -- path-style, SigV4 with an unsigned payload, Content-MD5,
``If-None-Match: *`` -- with ``http.client`` over one keep-alive connection per worker thread. Answers are
classified by :func:`sidecar.store_errors.from_answer`, the table botocore's errors go through too, and
every attempt is reported to the same observer (:class:`sidecar.store_health.StoreHealth`).

It is used only where it sends exactly what botocore would (:func:`direct_put_for` says why not otherwise):
an explicit endpoint (R2, MinIO...), static keys, no proxy, and header values that are printable ASCII.
It sends the parts of multipart uploads too (UploadPart, the same PUT with a query); creating, completing
and aborting them, HEADs and everything else stay on boto3.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from html import unescape
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit
from urllib.request import getproxies, proxy_bypass

from sidecar import __version__
from sidecar.errors import StoreError, TransientStoreError
from sidecar.filebody import FileSlice
from sidecar.sigv4 import SigV4Signer, s3_path
from sidecar.store import Body, ObjectHeaders
from sidecar.store_errors import from_answer

if TYPE_CHECKING:
    from sidecar.config import Settings

RequestObserver = Callable[[str, str], None]
SEND_CHUNK = 1024 * 1024
_CODE = re.compile(r"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
USER_AGENT = f"comfyui-r2-sidecar/{__version__}"


class _FileTrouble(Exception):
    """Reading the body from the file failed (``error``) or ended early (None) while the request was sent."""

    def __init__(self, error: OSError | None) -> None:
        super().__init__(error)
        self.error = error


def _dropped(sock: object) -> bool:
    """An idle keep-alive socket that is readable was closed (or spoken on) by the server: do not reuse it."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)  # type: ignore[arg-type] # any object with fileno()
    return bool(poller.poll(0))


def _error_fields(payload: bytes) -> tuple[str, str]:
    text = payload[:4096].decode("utf-8", "replace")
    code, message = _CODE.search(text), _MESSAGE.search(text)
    return (unescape(code.group(1)) if code else "", unescape(message.group(1)) if message else "")


def part_query(number: int, upload_id: str) -> str:
    """UploadPart's query as it is sent and signed: names sorted, values URI-encoded (SigV4's canonical form)."""
    return f"partNumber={number}&uploadId={quote(upload_id, safe='-_.~')}"


class DirectPut:
    """Conditional single PUTs of one bucket over ``http.client``; raises :class:`StoreError` subclasses."""

    def __init__(self, endpoint: str, bucket: str, signer: SigV4Signer, *, connect_timeout_s: float,
                 read_timeout_s: float, ssl_context: ssl.SSLContext | None = None,
                 observer: RequestObserver | None = None, secrets: Iterable[str] = ()) -> None:
        parts = urlsplit(endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._host_header = parts.netloc
        self._bucket = bucket
        self._signer = signer
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._ssl = ssl_context if self._https else None
        self._observer = observer or (lambda operation, status: None)
        self._secrets = tuple(s for s in secrets if s)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[http.client.HTTPConnection] = []

    @staticmethod
    def accepts(headers: ObjectHeaders) -> bool:
        """True when every header value can go out as botocore would send it: printable ASCII (the settings
        are checked so at start; a prompt id in the metadata is whatever the ComfyUI client chose)."""
        values = (headers.content_type, headers.cache_control, headers.content_disposition, headers.storage_class)
        return all(_PRINTABLE.fullmatch(v) for v in (*values, *(v for _, v in headers.metadata)))

    def put(self, key: str, data: Body, *, md5_hex: str, headers: ObjectHeaders) -> str:
        """Send the PUT; return the ETag the store answered with ("" if none), unproven."""
        sent = [("if-none-match", "*"), *headers.http_headers(md5_hex)]
        return self._send("PutObject", key, "", sent, data, md5_hex=md5_hex)

    def upload_part(self, key: str, upload_id: str, number: int, data: bytearray, *, md5_hex: str) -> str:
        """Send one part of a multipart upload (UploadPart: a PUT with ``partNumber`` and ``uploadId``); return
        its ETag, unproven. Over http botocore would also hash the whole part with SHA-256 for the signature:
        here, as over https, the signed Content-MD5 is the integrity check."""
        query = part_query(number, upload_id)
        return self._send("UploadPart", key, query, [], data, md5_hex=md5_hex)

    def _send(self, operation: str, key: str, query: str, extra: list[tuple[str, str]], data: Body, *,
              md5_hex: str) -> str:
        path = s3_path(self._bucket, key)
        sent = [
            ("host", self._host_header), ("content-length", str(len(data))),
            ("content-md5", base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")), *extra,
        ]
        conn = self._connection()
        try:
            self._connect(conn)
            target = f"{path}?{query}" if query else path
            status, etag, payload = self._exchange(conn, target, self._signer.sign("PUT", path, sent, query=query),
                                                   data)
        except _FileTrouble as trouble:  # the file's problem, not the store's: StoreHealth hears nothing
            conn.close()  # half a body went out on it
            if trouble.error is not None:
                raise trouble.error from None  # EIO, ESTALE...: the uploader's source-file handling
            raise TransientStoreError("the file ended before its hashed length", operation=operation, key=key,
                                      code="IncompleteBody") from None
        except (OSError, http.client.HTTPException) as exc:  # no answer: connection trouble, not the file's
            conn.close()
            self._observer(operation, "error")
            raise self._failure(exc, operation, key) from None
        self._observer(operation, str(status))
        if 200 <= status < 300:
            return etag.strip('"')
        code, message = _error_fields(payload)
        raise from_answer(code, status, message, operation=operation, key=key, secrets=self._secrets)

    def close(self) -> None:
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            conn.close()

    # -- the wire ---------------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._connect_timeout_s,
                                                   context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout_s)
            self._local.conn = conn
            with self._lock:
                self._open.append(conn)
        return conn

    def _connect(self, conn: http.client.HTTPConnection) -> None:
        if conn.sock is not None and _dropped(conn.sock):
            conn.close()
        if conn.sock is None:
            conn.connect()  # within the connect timeout; the answer may then take the read timeout
            sock: socket.socket = conn.sock  # type: ignore[assignment] # set by connect()
            sock.settimeout(self._read_timeout_s)

    def _exchange(self, conn: http.client.HTTPConnection, path: str, headers: list[tuple[str, str]],
                  data: Body) -> tuple[int, str, bytes]:
        conn.putrequest("PUT", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("User-Agent", USER_AGENT)
        try:
            conn.endheaders()
            if isinstance(data, FileSlice):
                self._send_slice(conn, data)
            else:
                conn.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a store may answer (and close) before reading the whole body: its answer says why
        response = conn.getresponse()
        payload = response.read()
        return response.status, response.getheader("ETag") or "", payload

    @staticmethod
    def _send_slice(conn: http.client.HTTPConnection, body: FileSlice) -> None:
        left = len(body)
        while left > 0:
            try:
                chunk = body.read(min(SEND_CHUNK, left))
            except OSError as exc:
                raise _FileTrouble(exc) from None
            if not chunk:  # the file shrank under us: the store would wait for the promised length
                raise _FileTrouble(None)
            conn.send(chunk)
            left -= len(chunk)

    @staticmethod
    def _failure(exc: BaseException, operation: str, key: str) -> StoreError:
        """The same errors :func:`sidecar.store_errors.classify` gives botocore's transport failures."""
        if isinstance(exc, TimeoutError):
            return TransientStoreError("timed out", operation=operation, key=key, code="Timeout", scope="bucket")
        return TransientStoreError(f"connection failed ({type(exc).__name__})", operation=operation, key=key,
                                   code="ConnectionError", scope="bucket")


def direct_put_for(  # noqa: PLR0911 - one flat list of the reasons against it
    settings: Settings, *, observer: RequestObserver | None = None,
    secrets: Iterable[str] = (),
) -> tuple[DirectPut | None, str]:
    """A :class:`DirectPut` for these settings, or None and the reason botocore sends the PUTs instead."""
    endpoint = settings.resolved_endpoint
    if not settings.direct_put:
        return None, "SIDECAR_DIRECT_PUT=false"
    if not endpoint:
        return None, "AWS itself (no SIDECAR_ENDPOINT_URL): botocore's addressing and credential chain"
    if settings.access_key_id is None or settings.secret_access_key is None:
        return None, "no static keys: botocore's credential chain (the keys may rotate)"
    parts = urlsplit(endpoint)
    if parts.path not in ("", "/") or parts.query:
        return None, "the endpoint URL has a path"
    if parts.scheme in getproxies() and not proxy_bypass(parts.hostname or ""):
        return None, f"a proxy is set for {parts.scheme} (botocore sends through it)"
    context = None
    if parts.scheme == "https":
        try:
            context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
        except (OSError, ssl.SSLError) as exc:
            return None, f"AWS_CA_BUNDLE could not be loaded ({type(exc).__name__})"
        if not context.cert_store_stats().get("x509_ca"):
            return None, "no CA certificates in the system store (botocore uses its own bundle)"
    signer = SigV4Signer(settings.access_key_id.get_secret_value(), settings.secret_access_key.get_secret_value(),
                         settings.region)
    return DirectPut(endpoint, settings.bucket, signer, connect_timeout_s=settings.connect_timeout_s,
                     read_timeout_s=settings.read_timeout_s, ssl_context=context, observer=observer,
                     secrets=secrets), ""
