"""The one place a watched file is ever deleted, and every check that has to pass first.

A file is deleted only if its journal row is ``uploaded`` with a proven ETag and MD5, and the file on disk is
still exactly that uploaded version (size, mtime, inode, ctime; re-hashed when the row predates inodes or
the file's times look wrong), is a regular file reached without following any link, and no writer has it:
the kernel's lease check where it works, else no change for ``quiet_s``.

Deleting is a rename, a check and an unlink, all relative to a descriptor of the file's folder: the file
is first renamed to ``.sidecar-deleting-<row id>`` in its own folder, the renamed inode is checked again,
and only then unlinked. Whatever was swapped in at the name between the check and the rename is what gets
renamed, so it is checked and put back (with a hard link, which never replaces a newer file at the name).
A crash after the rename leaves the quarantined file; the next pass over the row (its name now vanished)
finds it there and finishes or puts it back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.errors import SourceFileError
from sidecar.journal_schema import UPLOADED, FileRow, Version
from sidecar.localfile import OPEN_FLAGS, open_parent, writer_holds

log = structlog.get_logger(__name__)

QUARANTINE = b".sidecar-deleting-"
CHUNK = 1024 * 1024

# Why a file was kept (a bounded label for metrics and logs).
KEPT_REASONS = ("not_uploaded", "changed", "writing", "vanished", "symlink", "not_regular", "outside_root",
                "digest", "raced", "permission", "error")


@dataclass(frozen=True, slots=True)
class Verdict:
    deleted: bool
    reason: str  # "deleted", or one of KEPT_REASONS
    size: int = 0


def _version(st: os.stat_result) -> Version:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _md5_of(fd: int) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _doubtful(row: FileRow, st: os.stat_result, now_ns: int) -> bool:
    """A version match proves less than usual: a row from before inodes were recorded, or times ahead."""
    return row.ino == 0 or row.ctime_ns == 0 or st.st_mtime_ns > now_ns or st.st_ctime_ns > now_ns


def check(folder: int, name: bytes, row: FileRow, *, quiet_s: float, now_ns: int) -> str | None:
    """None if ``name`` in ``folder`` is exactly the uploaded, unwritten version of ``row``; else why not."""
    if row.state != UPLOADED or not row.md5 or not row.etag:
        return "not_uploaded"
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return "vanished"
    kind = "symlink" if stat.S_ISLNK(st.st_mode) else None if stat.S_ISREG(st.st_mode) else "not_regular"
    if kind is not None:
        return kind
    if _version(st) != row.version and not (row.ino == 0 and (st.st_size, st.st_mtime_ns) == row.version[:2]):
        return "changed"
    fd = os.open(name, OPEN_FLAGS, dir_fd=folder)
    try:
        return _check_open(fd, st, row, quiet_s=quiet_s, now_ns=now_ns)
    finally:
        os.close(fd)


def _check_open(fd: int, st: os.stat_result, row: FileRow, *, quiet_s: float, now_ns: int) -> str | None:
    """The checks on the opened file: still the same inode and version, no writer, the digest if doubtful."""
    if _version(os.fstat(fd)) != _version(st):
        return "changed"
    holds = writer_holds(fd)
    if holds or (holds is None and now_ns - st.st_ctime_ns < quiet_s * 1e9):
        return "writing"
    if _doubtful(row, st, now_ns):
        os.set_blocking(fd, True)
        if _md5_of(fd) != row.md5:
            return "digest"
    return None


def delete(root: Path, row: FileRow, *, quiet_s: float, dry_run: bool = False) -> Verdict:
    """Delete the file of ``row`` if every check passes (see the module docstring); never raises."""
    try:
        folder, name = open_parent(root, row.path)
    except SourceFileError as exc:
        return Verdict(False, exc.reason if exc.reason in KEPT_REASONS else "error")
    try:
        return _delete_in(folder, name, row, quiet_s=quiet_s, dry_run=dry_run)
    except OSError as exc:
        permission = exc.errno in (errno.EACCES, errno.EPERM)
        log.warning("retention_error", path=os.fsdecode(row.path), error=exc.strerror or str(exc),
                    hint="the sidecar's user needs write permission on the file's folder" if permission else None)
        return Verdict(False, "permission" if permission else "error")
    finally:
        os.close(folder)


def _delete_in(folder: int, name: bytes, row: FileRow, *, quiet_s: float, dry_run: bool) -> Verdict:
    if _quarantined(folder, row) and not dry_run:  # a pass cut short after its rename: finish it, or undo it
        return _finish(folder, name, row)
    reason = check(folder, name, row, quiet_s=quiet_s, now_ns=time.time_ns())
    if reason is not None:
        return Verdict(False, reason)
    if dry_run:
        return Verdict(True, "deleted", row.size)
    parked = QUARANTINE + str(row.id).encode()
    os.rename(name, parked, src_dir_fd=folder, dst_dir_fd=folder)
    return _finish(folder, name, row)


def _quarantined(folder: int, row: FileRow) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISREG(os.stat(QUARANTINE + str(row.id).encode(), dir_fd=folder, follow_symlinks=False).st_mode)
    return False


def _finish(folder: int, name: bytes, row: FileRow) -> Verdict:
    """The file of ``row`` sits at its quarantine name: unlink it if it is the uploaded version, else put
    it back under its name (never over a file that appeared there since)."""
    parked = QUARANTINE + str(row.id).encode()
    # The rename itself moved the ctime; the check wants the content version, so compare without it.
    st = os.stat(parked, dir_fd=folder, follow_symlinks=False)
    same = stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns) and (
        row.ino in (0, st.st_ino))
    if same:
        os.unlink(parked, dir_fd=folder)
        return Verdict(True, "deleted", st.st_size)
    try:
        os.link(parked, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        os.unlink(parked, dir_fd=folder)
        log.info("retention_put_back", path=os.fsdecode(row.path))
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        log.warning("retention_put_back_blocked", path=os.fsdecode(row.path), kept_as=os.fsdecode(parked),
                    hint="a file appeared at the name meanwhile; the other one is kept under the quarantine name")
    return Verdict(False, "raced")
