"""Filesystems mounted below the watched root, from ``/proc/self/mountinfo``.

An inotify watch belongs to the directory it was placed on: a filesystem mounted over a watched subfolder
afterwards hides that directory, and nothing written into the mount sends an event (the files would wait
for the periodic scan). Maintenance compares this set every cycle and rebuilds the watcher (which watches
the mount's own root then) and rescans when it changes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def mounts_under(root: Path, mountinfo: str = MOUNTINFO) -> frozenset[bytes] | None:
    """Mount points strictly below ``root``, relative to it; None if the kernel does not say."""
    base = os.fsencode(os.path.realpath(root)).rstrip(b"/") + b"/"
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            point = _unescape(fields[4])
            if point.startswith(base) and len(point) > len(base):
                found.add(point[len(base):])
    return frozenset(found)
