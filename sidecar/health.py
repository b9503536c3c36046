"""The watcher canary: the only proof that events still arrive (FIELD-NOTES §1).

``observer.is_alive()`` stays True when the inotify reader dies or the root is deleted and recreated, so
the daemon writes a small dot-file into the watched root every ``interval_s`` and expects its event back
within a grace period. A canary that does not come back means the watcher is deaf. A root that is no
longer the directory the watcher was started on (deleted, or deleted and recreated) is deaf at once: its
inotify watch died with the old inode, and waiting for a canary would only delay the repair. The canary
holds a descriptor on the watched directory, so a deleted root shows ``st_nlink == 0`` and its inode
number cannot be handed to a recreated folder (ext4 reuses freed inode numbers at once).

After every (re)start of the watcher the caller :meth:`arms <Canary.arm>` the canary: a canary written
*before* the new watch exists can never come back, so writing it on the deaf verdict itself would make
every repair look failed and restart the watcher forever.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("sidecar.health")

CANARY_NAME = b".sidecar-canary"
OK, WAITING, DEAF = "ok", "waiting", "deaf"
# Why the watcher is deaf: bounded, snake_case (a metric label and a log field).
THREAD_STOPPED, ROOT_REPLACED, CANARY_LOST = "thread_stopped", "root_replaced", "canary_lost"
REASONS = (THREAD_STOPPED, ROOT_REPLACED, CANARY_LOST)


class Canary:
    """Writes the canary file and judges whether its event came back."""

    def __init__(self, root: Path, *, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = os.path.join(os.fsencode(root), CANARY_NAME)
        self._root = root
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._root_fd: int | None = None
        self.written_at = 0.0
        self.seen_at = 0.0
        self.verdict = WAITING
        self.reason = ""

    @staticmethod
    def matches(rel: bytes) -> bool:
        return rel == CANARY_NAME

    def seen(self) -> None:
        with self._lock:
            self.seen_at = self._clock()

    def arm(self) -> None:
        """Call right after the watcher (re)started: hold its root directory open and write a fresh canary.

        A canary that cannot be written is no crash: it never comes back, so the watcher reads as deaf.
        """
        self._root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        old, self._root_fd = self._root_fd, fd
        if old is not None:
            os.close(old)
        try:
            self.write()
        except OSError as exc:
            log.warning("canary_write_failed", error=exc.strerror or str(exc))

    def root_intact(self) -> bool:
        """True while the watched path is still the directory the watcher was started on (or not armed)."""
        fd = self._root_fd
        if fd is None:
            return True
        try:
            held, current = os.fstat(fd), os.stat(self._root)
        except OSError:
            return False
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)

    def close(self) -> None:
        """Release the descriptor on the watched directory."""
        fd, self._root_fd = self._root_fd, None
        if fd is not None:
            os.close(fd)

    def write(self) -> None:
        """(Re)write the canary as a fresh file renamed into place; creates the root if it was deleted.

        Never through what sits at the canary's name: a link there (to a file outside the folder, to the
        journal) or a FIFO is replaced by the rename, not written into or waited on.
        """
        self._root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.written_at = self._clock()
        tmp = self._path + b".tmp-%d" % os.getpid()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:  # left by a crash of ours, or planted: remove the name itself, once
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, str(time.time()).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self._path)

    def check(self, observer_alive: bool, *, grace_s: float) -> str:
        """ok, waiting (written, not yet due) or deaf; rewrites the canary when a proven one is due.

        A deaf verdict writes nothing: the caller restarts the watcher and then calls :meth:`arm`.
        """
        now = self._clock()
        with self._lock:
            proven = self.seen_at >= self.written_at > 0
            overdue = now - self.written_at > grace_s
            due = now - self.written_at >= self.interval_s
        if not observer_alive:
            verdict, self.reason = DEAF, THREAD_STOPPED
        elif not self.root_intact():
            verdict, self.reason = DEAF, ROOT_REPLACED
        elif proven:
            verdict, self.reason = OK, ""
        elif overdue:
            verdict, self.reason = DEAF, CANARY_LOST
        else:
            verdict = WAITING
        if verdict == OK and due:
            try:
                self.write()
            except OSError as exc:
                log.warning("canary_write_failed", error=exc.strerror)
        if verdict != WAITING:
            self.verdict = verdict
        return verdict

    @property
    def healthy(self) -> bool:
        return self.verdict != DEAF
