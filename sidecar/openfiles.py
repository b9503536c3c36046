"""Who holds a watched file open, from inotify's open and close events (ours included).

A change of a file nobody holds open -- ``truncate(2)`` by path, say -- sends a modify event and never a
close: without this count, the events-mode writer check (:mod:`sidecar.writercheck`) could only wait for
its close timeout. A count is trusted only for a path whose opens were all seen since the watch began:
one that was seen closing back to zero. A writer that opened the file before the watch existed (a daemon
restart mid-write) was never counted, so its path is not trusted until its own close. A rebuilt watch or
an overflow (events lost) forgets everything; memory is bounded (the oldest trusted paths are dropped,
which only brings the safe wait back).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

TRUSTED_MEMORY = 20_000


class OpenFiles:
    """Counts open descriptors per path; says when a change happened while none was open."""

    def __init__(self, memory: int = TRUSTED_MEMORY) -> None:
        self._lock = threading.Lock()
        self._open: dict[bytes, int] = {}
        self._trusted: OrderedDict[bytes, None] = OrderedDict()
        self._memory = memory

    def note(self, rel: bytes, source: str) -> bool:
        """Fold one event in; True for a ``modify`` while nobody holds the file open (a trusted count)."""
        with self._lock:
            if source == "open":
                self._open[rel] = self._open.get(rel, 0) + 1
            elif source in ("close", "close_nowrite"):
                left = self._open.get(rel, 0) - 1
                if left > 0:
                    self._open[rel] = left
                    return False
                self._open.pop(rel, None)
                if left == 0:  # every open of this path was seen closing: from now on the count is whole
                    self._trusted[rel] = None
                    self._trusted.move_to_end(rel)
                    if len(self._trusted) > self._memory:
                        self._trusted.popitem(last=False)
            elif source == "modify":
                return rel in self._trusted and rel not in self._open
            elif source == "move":
                self._trusted.pop(rel, None)  # another inode now: its opens were not counted
            return False

    def reset(self) -> None:
        """Events may have been lost (overflow, a rebuilt watch): trust nothing until seen closing again."""
        with self._lock:
            self._open.clear()
            self._trusted.clear()
