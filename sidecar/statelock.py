"""One daemon per journal: an exclusive advisory lock (``flock``) on ``<state dir>/sidecar.lock``.

Held for the life of the process (the kernel drops it when the process dies, kill -9 included, so a
stale lock never blocks a restart). A second ``sidecar run`` or ``sidecar scan`` on the same state folder
would "recover" the first one's in-flight rows and abort its multipart uploads; it exits 2 instead, with
one line naming the holder's PID. ``retry-failed`` needs no lock: it only rewrites rows, which SQLite
serialises, and the running daemon claims them within a second.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from sidecar.errors import ConfigError

LOCK_NAME = "sidecar.lock"


class StateLocked(ConfigError):
    """Another process holds the state folder's lock."""


class StateLock:
    """The state folder's lock; :meth:`acquire` once, released when the process exits (or :meth:`release`)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        old_umask = os.umask(0o077)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ConfigError(f"SIDECAR_STATE_DIR: cannot create the lock file {self.path} "
                              f"({exc.strerror})") from None
        finally:
            os.umask(old_umask)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"SIDECAR_STATE_DIR: cannot lock {self.path} ({exc.strerror})") from None
            who = f"pid {holder}" if holder else "another process"
            raise StateLocked(f"SIDECAR_STATE_DIR: {self.path.parent} is in use by another sidecar ({who}); "
                              "one daemon per journal") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> int | None:
        """The PID that holds the lock now, or None if nobody does (without taking it for long)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _read_pid(fd) or -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
