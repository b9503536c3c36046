"""Which writer check works here, probed once at start: ``lease``, ``events`` or ``quiet``.

A finished file is told apart from one still being written in one of three ways, strongest first:

``lease``
    the kernel refuses a read lease while any process has the file open for writing (see
    :func:`sidecar.localfile.writer_holds`). Conclusive, but only on files this process owns, unless it holds
    ``CAP_LEASE``. In the image ComfyUI runs as root and the sidecar as its own user, and Docker's default
    capability set has no ``CAP_LEASE`` (FIELD-NOTES §6), so there it works on none of ComfyUI's files.
``events``
    inotify: a file that was seen being modified is ready only after a close or move event that came after
    its last modification; a file seen only by a create event or a scan (watchdog's walk of a new folder,
    a file moved in, one written while the sidecar was down) only after a quiet period measured from its
    last observed change.
``quiet``
    no events (the polling observer): the quiet period from the last observed change, always.

The mode names the check that applies to files *owned by someone else*; files this process owns get the
lease whatever the mode (``lease_own_files``). See the decision table in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from sidecar.localfile import F_RDLCK, F_SETLEASE, F_UNLCK

MODES = ("lease", "events", "quiet")
CAP_LEASE = 28  # linux/capability.h
PROBE_NAME = ".sidecar-lease-probe"


@dataclass(frozen=True, slots=True)
class WriterCheck:
    """The outcome of the probe: the mode and the facts it was chosen from."""

    mode: str
    lease_own_files: bool
    cap_lease: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "lease_own_files": self.lease_own_files, "cap_lease": self.cap_lease,
                "uid": os.geteuid(), "reason": self.reason}


def has_cap_lease() -> bool:
    """True when CAP_LEASE is in this process's effective set (read from /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_LEASE & 1)
    except (OSError, ValueError):
        pass
    return False


def lease_works_in(folder: Path) -> bool:
    """True when this filesystem grants a read lease on a file we own (a fresh temp file, removed again).

    Some filesystems (network mounts, FUSE) refuse leases to everyone: there the lease is no check at all.
    """
    name = f"{PROBE_NAME}-{os.getpid()}"
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=folder_fd)
    except OSError:
        os.close(folder_fd)
        return False
    try:
        fcntl.fcntl(fd, F_SETLEASE, F_RDLCK)
        fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
        return True
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)  # granted in principle, refused for a writer
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=folder_fd)
        os.close(folder_fd)


def choose(folders: list[Path], watcher_mode: str) -> WriterCheck:
    """Pick the strongest check that holds for files written by another user, given the watcher's mode.

    ``folders`` are tried in order for the lease probe (the watch folder first: leases are a property of
    its filesystem; the state folder where the watch folder is not writable by us).
    """
    cap = has_cap_lease()
    fs_ok = any(lease_works_in(folder) for folder in folders)
    if cap and fs_ok:
        return WriterCheck("lease", True, True, "CAP_LEASE held: the kernel answers for every file")
    if not fs_ok:
        why = "the filesystem grants no read lease"
    else:
        why = "no CAP_LEASE: a read lease is refused on files owned by other users (e.g. ComfyUI as root)"
    if watcher_mode == "inotify":
        return WriterCheck("events", fs_ok, cap, f"{why}; inotify close events decide")
    return WriterCheck("quiet", fs_ok, cap, f"{why}; no inotify events ({watcher_mode}): quiet period decides")
