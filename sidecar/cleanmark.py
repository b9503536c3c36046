"""The journal's clean-close mark: lets an open skip the integrity check of a file nothing touched since.

``PRAGMA quick_check`` reads every page (~0.9 s per 1,000,000 files on a 2-core pod), and a pod restarted
after a clean stop would pay it for a file this process checked at its own open and closed itself. At a
clean close (the last connection gone, so SQLite has checkpointed and removed the WAL) the journal's stat
is written beside it as ``<journal>.clean``; the next open trusts the file, once, only if

* the mark is there (it is removed at every open, so a crash afterwards always leads to a check),
* the journal's device, inode, size, mtime and ctime are exactly those recorded (any write, by anyone,
  moves the ctime; a replaced file has another inode), and no WAL with content lies beside it,
* the recorded ctime is older than the mark itself: file timestamps come from a coarse clock (a jiffy), so a
  write in the same tick as the close could leave the times unchanged; the mark's time is moved on to a
  later tick when it lands in the close's (a few ms), and a mark that stays in that tick is ignored.

Damage that changes no metadata (a failing disk) is not caught here, as at any open the check is not run for;
queries that meet it fail, and the daemon reports the journal as unusable (see :meth:`Database.problem`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
TICK_WAIT_S = 0.002
TICK_TRIES = 25  # file times move once per jiffy (1-10 ms): the mark waits up to 50 ms for the next one


def mark_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".clean")


def _facts(st: os.stat_result) -> dict[str, int]:
    return {name: int(getattr(st, name)) for name in FIELDS}


def _wal_is_empty(journal: Path) -> bool:
    try:
        return os.stat(f"{journal}-wal").st_size == 0
    except FileNotFoundError:
        return True


def take(journal: Path) -> bool:
    """True when ``journal`` is unchanged since a clean close; the mark is removed either way."""
    mark = mark_path(journal)
    try:
        with mark.open("rb") as f:
            marked_at = os.fstat(f.fileno()).st_mtime_ns
            recorded = json.loads(f.read(4096))
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            mark.unlink()
    try:
        now = _facts(os.stat(journal))
    except OSError:
        return False
    return (isinstance(recorded, dict) and recorded == now and now["st_ctime_ns"] < marked_at
            and _wal_is_empty(journal))


def leave(journal: Path) -> None:
    """Write the mark after the last connection closed; nothing when a WAL with content remains (another
    connection is open) or the mark cannot be written: the next open then checks."""
    if not _wal_is_empty(journal):
        return
    mark = mark_path(journal)
    part = mark.with_name(mark.name + ".part")
    try:
        facts = _facts(os.stat(journal))
        with part.open("w", encoding="ascii") as f:
            json.dump(facts, f)
        os.replace(part, mark)
        for _ in range(TICK_TRIES):  # the close's checkpoint wrote the journal a moment ago, maybe this tick
            if os.stat(mark).st_mtime_ns > facts["st_ctime_ns"]:
                return
            time.sleep(TICK_WAIT_S)
            os.utime(mark)
    except OSError:
        with contextlib.suppress(OSError):
            part.unlink()
