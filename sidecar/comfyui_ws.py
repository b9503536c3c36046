"""ComfyUI's websocket, read only as a trigger: every ``status`` broadcast means the queue changed.

ComfyUI sends ``{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": N}}}}`` to every
connected client when a prompt is queued, starts, and ends -- the last one after its history is written
(shared/FIELD-NOTES.md §7). So with this socket open, :mod:`sidecar.jobs` asks ``/api/jobs`` only when a
status message arrives, instead of polling while a prompt runs, and learns of a finished prompt within a
millisecond or two. Messages that name a prompt or its files go only to the submitter's socket; this one
connects with its own random ``clientId`` (taking a submitter's id would silently cut that client off).

A minimal RFC 6455 client on the standard library (text frames, fragments, ping/pong, close; no
extensions); anything unexpected closes the socket, and the caller reconnects with backoff. ``wss`` when the
URL is https.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # previews arrive as binary frames; they are read and dropped
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0
REFUSALS_BEFORE_GIVING_UP = 3  # upgrades answered with plain HTTP in a row: polling from then on,
RETRY_UNSUPPORTED_S = 600.0  # with one more try this often


class SocketClosed(Exception):
    pass


class NoWebsocket(SocketClosed):
    """The server answered the upgrade with plain HTTP: it has no websocket here."""


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 65536))
        if not chunk:
            raise SocketClosed("the connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (clients must mask)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x80 | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class StatusSocket:
    """Connects, reads, calls ``on_status(queue_remaining)``; reconnects until ``stop`` is set."""

    def __init__(self, base_url: str, *, on_status: Callable[[int | None], None],
                 on_connected: Callable[[bool, str], None], timeout_s: float = 5.0) -> None:
        parts = urlsplit(base_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._path = (parts.path.rstrip("/") + "/ws?clientId=comfyui-r2-sidecar-" + os.urandom(6).hex())
        self._on_status = on_status
        self._on_connected = on_connected
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.connected = False

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self._host, self._port), timeout=self._timeout_s)
        sock: socket.socket = raw
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(raw, server_hostname=self._host)
        key = base64.b64encode(os.urandom(16)).decode()
        host = f"[{self._host}]" if ":" in self._host else self._host
        sock.sendall((f"GET {self._path} HTTP/1.1\r\nHost: {host}:{self._port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk or len(head) > 16384:
                raise SocketClosed("no websocket handshake")
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode(), usedforsecurity=False).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            raise NoWebsocket(f"no websocket here ({lines[0][:60]})")
        sock.settimeout(None)  # blocks until a message; stop() shuts the socket down
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def _messages(self, sock: socket.socket) -> None:
        parts: list[bytes] = []
        kind = 0
        while True:
            b0, b1 = _read_exact(sock, 2)
            opcode, size = b0 & 0x0F, b1 & 0x7F
            if size == 126:
                size = struct.unpack("!H", _read_exact(sock, 2))[0]
            elif size == 127:
                size = struct.unpack("!Q", _read_exact(sock, 8))[0]
            mask = _read_exact(sock, 4) if b1 & 0x80 else b""
            if size > MAX_MESSAGE_BYTES:
                raise SocketClosed(f"a frame of {size} bytes")
            payload = _read_exact(sock, size)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise SocketClosed("closed by ComfyUI")
            if opcode == 0x9:
                with self._lock:
                    sock.sendall(_frame(0xA, payload))
                continue
            if opcode in (0x1, 0x2):
                kind, parts = opcode, [payload]
            elif opcode == 0x0:
                parts.append(payload)
            else:
                continue
            if b0 & 0x80:
                if kind == 0x1:
                    self._text(b"".join(parts))
                parts = []

    def _text(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("type") != "status":
            return
        status = message.get("data", {}).get("status", {}) if isinstance(message.get("data"), dict) else {}
        remaining = status.get("exec_info", {}).get("queue_remaining") if isinstance(status, dict) else None
        self._on_status(remaining if isinstance(remaining, int) else None)

    def run(self, stop: threading.Event) -> None:
        delay, refusals = RECONNECT_MIN_S, 0
        while not stop.is_set():
            try:
                sock = self._connect()
            except NoWebsocket as exc:  # each try is a request: not forever against a server without one
                refusals += 1
                if refusals >= REFUSALS_BEFORE_GIVING_UP:  # the thread lives on (/healthz counts it)
                    if refusals == REFUSALS_BEFORE_GIVING_UP:
                        self._on_connected(False, str(exc))
                    stop.wait(RETRY_UNSUPPORTED_S)  # a ComfyUI upgraded in place may have one later
                    continue
                stop.wait(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
                continue
            except (OSError, SocketClosed, ValueError):  # down or restarting: a refused connect costs nothing
                stop.wait(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
                continue
            refusals = 0
            with self._lock:
                self._sock = sock
            self.connected, delay = True, RECONNECT_MIN_S
            self._on_connected(True, "")
            try:
                self._messages(sock)
            except (OSError, SocketClosed, ValueError, struct.error):
                pass
            finally:
                self.connected = False
                with self._lock:
                    self._sock = None
                sock.close()
                self._on_connected(False, "")
            stop.wait(delay)

    def stop(self) -> None:
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
