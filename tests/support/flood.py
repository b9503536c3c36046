"""A connection flood against an HTTP port, from one thread: slow request heads and oversized headers.

``slow`` connections send a request head that never ends, one short header line every ``trickle_s`` seconds
(a slowloris); ``big`` connections send header bytes as fast as the socket takes them, up to 1 MiB, in
``big_chunk`` pieces every ``big_every_s``. Whatever the server closes is reopened at once, so the counts
hold for the whole run. Counters say how many connections were opened and how many the server ended.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

SLOW_HEAD = b"GET /status HTTP/1.1\r\nHost: sidecar\r\n"
BIG_HEAD = b"GET /status HTTP/1.1\r\nHost: sidecar\r\nX-Big: "


@dataclass
class _Conn:
    kind: str
    sock: socket.socket
    next_send: float
    sent: int = 0


@dataclass
class FloodCounts:
    opened: dict[str, int] = field(default_factory=lambda: {"slow": 0, "big": 0})
    ended_by_server: dict[str, int] = field(default_factory=lambda: {"slow": 0, "big": 0})
    connect_failures: int = 0
    bytes_sent: int = 0


class Flood:
    """Keeps ``slow`` + ``big`` connections open against 127.0.0.1:``port`` until stop()."""

    def __init__(
        self, port: int, *, slow: int, big: int, trickle_s: float = 2.0, big_chunk: int = 64 * 1024,
        big_every_s: float = 0.2,
    ) -> None:
        self.port = port
        self.wanted = {"slow": slow, "big": big}
        self.trickle_s = trickle_s
        self.big_chunk = b"a" * big_chunk
        self.big_every_s = big_every_s
        self.counts = FloodCounts()
        self._conns: dict[int, _Conn] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> FloodCounts:
        self._stop.set()
        self._thread.join(10)
        for conn in list(self._conns.values()):
            self._drop(conn, by_server=False)
        self._selector.close()
        return self.counts

    def open_now(self) -> dict[str, int]:
        counts = {"slow": 0, "big": 0}
        for conn in self._conns.values():
            counts[conn.kind] += 1
        return counts

    def _open(self, kind: str) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", self.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.counts.connect_failures += 1
            return
        conn = _Conn(kind, sock, next_send=time.monotonic())
        self._conns[sock.fileno()] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self.counts.opened[kind] += 1

    def _drop(self, conn: _Conn, *, by_server: bool) -> None:
        fd = conn.sock.fileno()
        if fd in self._conns:
            del self._conns[fd]
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        conn.sock.close()
        if by_server:
            self.counts.ended_by_server[conn.kind] += 1

    def _send(self, conn: _Conn, now: float) -> None:
        if conn.kind == "slow":
            payload = SLOW_HEAD if conn.sent == 0 else b"X-Slow: %d\r\n" % conn.sent
            conn.next_send = now + self.trickle_s
        else:
            payload = BIG_HEAD if conn.sent == 0 else self.big_chunk
            conn.next_send = now + self.big_every_s
            if conn.sent >= 1024 * 1024:
                return  # this one has said enough; it waits for the server to end it
        try:
            sent = conn.sock.send(payload)
        except BlockingIOError:
            return  # the server is not reading: exactly what a flood wants
        except OSError:
            self._drop(conn, by_server=True)
            return
        conn.sent += sent
        self.counts.bytes_sent += sent

    def _run(self) -> None:
        while not self._stop.is_set():
            for kind, wanted in self.wanted.items():
                missing = wanted - sum(1 for c in self._conns.values() if c.kind == kind)
                for _ in range(missing):
                    self._open(kind)
            for key, _events in self._selector.select(timeout=0.05):
                conn: _Conn = key.data
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the server ended it (after a 431, a deadline, or a reset)
                    self._drop(conn, by_server=True)
            now = time.monotonic()
            for conn in list(self._conns.values()):
                if now >= conn.next_send:
                    self._send(conn, now)
