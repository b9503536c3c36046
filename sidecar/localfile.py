"""Safe access to files in the watched tree: never follow a link out of the root, never block on a FIFO.

:func:`open_regular` is the only way the sidecar opens a watched file. :func:`writer_holds` asks the kernel
whether any process still has the file open for writing (a read lease is refused if so), which is how a
file written in place, like ComfyUI's PNGs, is told apart from a finished one without waiting long.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from sidecar.errors import SourceFileError

# OS errors that say "not now" rather than "never": the file is retried with backoff, not parked.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ENOMEM, errno.EINTR,
     errno.ETIMEDOUT, errno.ENOBUFS, errno.EBUSY, errno.ENOLCK, errno.EDEADLK}
)
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_RDLCK = getattr(fcntl, "F_RDLCK", 0)
F_UNLCK = getattr(fcntl, "F_UNLCK", 2)
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def relative(root: Path, path: str | bytes) -> bytes | None:
    """``path`` relative to ``root`` as raw bytes, or None if it is not below the root."""
    raw = os.fsencode(path)
    base = os.fsencode(root).rstrip(b"/") + b"/"
    return raw[len(base):] if raw.startswith(base) and len(raw) > len(base) else None


def open_parent(root: Path, relpath: bytes) -> tuple[int, bytes]:
    """A descriptor of the folder holding ``relpath`` below ``root``, and the file's name in it.

    The path is walked one folder at a time from a descriptor of the root (``openat`` with ``O_NOFOLLOW``),
    so no link below the root is ever followed, not even one swapped in for a folder while we look: a
    resolve-then-open leaves that window open. Raises :class:`SourceFileError` (``vanished``,
    ``outside_root``, ``unreadable``); the caller closes the descriptor.
    """
    shown = os.fsdecode(relpath)
    parts = relpath.split(b"/")
    if any(part in (b"", b".", b"..") for part in parts):
        raise SourceFileError("outside_root", shown)
    try:
        folder = os.open(os.fsencode(root), FOLDER_FLAGS & ~os.O_NOFOLLOW)  # the root itself may be a link
    except OSError as exc:
        raise source_error(exc, shown) from None
    for part in parts[:-1]:
        try:
            inner = os.open(part, FOLDER_FLAGS, dir_fd=folder)
        except OSError as exc:
            reason = _folder_reason(exc, part, folder)
            os.close(folder)
            raise source_error(exc, shown, reason) from None
        os.close(folder)
        folder = inner
    return folder, parts[-1]


def open_regular(root: Path, relpath: bytes) -> tuple[int, os.stat_result]:
    """Open a file below ``root`` read-only; raise :class:`SourceFileError` with a bounded reason if unfit.

    Reasons: ``vanished``, ``symlink``, ``outside_root``, ``not_regular``, ``unreadable``. Every failure,
    including a race with a rename, is one of the reasons (see :func:`open_parent`).
    """
    shown = os.fsdecode(relpath)
    folder, name = open_parent(root, relpath)
    try:
        fd = os.open(name, OPEN_FLAGS, dir_fd=folder)
    except OSError as exc:
        raise source_error(exc, shown) from None
    finally:
        os.close(folder)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceFileError("not_regular", shown)
    os.set_blocking(fd, True)
    return fd, st


def source_error(exc: OSError, shown: str, reason: str | None = None) -> SourceFileError:
    """An OS error on a watched file as a SourceFileError: its reason, its strerror, transient or not."""
    return SourceFileError(reason or _reason(exc), shown, detail=exc.strerror or str(exc),
                           transient=exc.errno in TRANSIENT_ERRNOS)


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "vanished"
    if exc.errno == errno.ELOOP:
        return "symlink"
    if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):  # sockets, unbound devices
        return "not_regular"
    return "unreadable"


def _folder_reason(exc: OSError, part: bytes, folder: int) -> str:
    """A folder on the way could not be entered: a link (refused by O_NOFOLLOW) leads outside the tree."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            if stat.S_ISLNK(os.lstat(part, dir_fd=folder).st_mode):
                return "outside_root"
        except OSError:
            pass
    return _reason(exc)


def writer_holds(fd: int) -> bool | None:
    """True if some process has the file open for writing, False if none, None if the kernel cannot tell.

    A read lease is granted only when no one has the file open for writing; it is released at once.
    It cannot be taken on files owned by others (without CAP_LEASE) or on some network filesystems.
    """
    try:
        fcntl.fcntl(fd, F_SETLEASE, F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None
    fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
    return False


def same_version(a: os.stat_result, b: os.stat_result) -> bool:
    """True when two stats describe the same content version of a file (size, mtime, inode, ctime)."""
    return (a.st_size, a.st_mtime_ns, a.st_ino, a.st_dev, a.st_ctime_ns) == (
        b.st_size, b.st_mtime_ns, b.st_ino, b.st_dev, b.st_ctime_ns)
