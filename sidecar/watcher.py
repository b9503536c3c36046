"""The filesystem watcher: turns inotify events into candidate paths. Never imports boto3.

What the watcher must know (FIELD-NOTES §1): new subfolders deliver *created* events but no close events,
so created, closed and moved-to are all candidates (modified events feed the writer check), and a new
folder is scanned; the handler must be O(1) because every handler runs on one thread; an inotify queue
overflow requests a rescan; and when inotify cannot be had (instance or watch limits) the watcher falls
back to watchdog's polling observer and says so. The inotify events are read by sidecar.inotify.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from sidecar.inotify import LEAF_LINKS, InotifyTree
from sidecar.localfile import relative

log = structlog.get_logger("sidecar.watcher")

# Modified events are the writer check's evidence that a writer is at work (see sidecar.writercheck): a file
# seen being modified is ready only after a close or move event. Opened/closed-no-write stay out: our own
# reads would produce them, and an open made before a folder's watch existed is never seen, so a count of
# open descriptors cannot be trusted (it let a torn video through: watchdog even simulates the create
# events of files in a new folder).
EVENT_FILTER = [FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent, DirMovedEvent,
                DirCreatedEvent]
POLL_INTERVAL_S = 2.0
RECHECK_S = 0.2  # a folder created during the start-up walk is watched once its own event is read

OnPath = Callable[[bytes, str], None]


LIMIT_HINT = "raise fs.inotify.max_user_watches (sysctl) and restart the sidecar to use inotify again"


def watched_dirs() -> set[tuple[int, int]] | None:
    """(st_dev, st_ino) of every inode this process's inotify instances watch, read from ``/proc/self/fdinfo``;
    None when the kernel does not say (no procfs, or no inotify instance)."""
    found: set[tuple[int, int]] = set()
    seen_inotify = False
    try:
        names = os.listdir("/proc/self/fdinfo")
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/proc/self/fdinfo/{name}", encoding="ascii", errors="replace") as info:
                lines = [line for line in info if line.startswith("inotify wd:")]
        except OSError:
            continue  # closed meanwhile
        for line in lines:
            seen_inotify = True
            fields = dict(item.split(":", 1) for item in line.split()[1:] if ":" in item)
            sdev = int(fields.get("sdev", "0"), 16)  # the kernel's dev_t: major << 20 | minor
            found.add((os.makedev(sdev >> 20, sdev & 0xFFFFF), int(fields.get("ino", "0"), 16)))
    return found if seen_inotify else None


def folders_below(root: bytes) -> Iterator[bytes]:
    """Every folder below ``root``, ``root`` first; symlinks are not followed.

    A folder whose link count is exactly 2 has no subfolders on filesystems that count them (a folder's
    count is 2 + its subfolders: ext4, xfs, tmpfs), so it is not listed: over a million files in 1,000 leaf
    folders this lists one folder instead of a million entries (~1 s of CPU). Filesystems that do not count
    subfolders report 1 (btrfs, some overlay and FUSE folders), and those folders are listed.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        yield folder
        try:
            if os.stat(folder, follow_symlinks=False).st_nlink == LEAF_LINKS:
                continue
            with os.scandir(folder) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue  # gone again, or unreadable: the caller judges the folder itself


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, on_path: OnPath, on_dir: Callable[[bytes], None]) -> None:
        self._root = root
        self._on_path = on_path
        self._on_dir = on_dir

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            kind = type(event)
            # Exact types first, most frequent first (a PNG is ~40 modify events); subclasses below.
            source = _SOURCES.get(kind)
            if source is None:
                if isinstance(event, DirMovedEvent | DirCreatedEvent):
                    rel = relative(self._root, event.dest_path or event.src_path)
                    if rel is not None:
                        self._on_dir(rel)
                    return
                source = next((s for cls, s in _SOURCES.items() if isinstance(event, cls)), None)
                if source is None:
                    return
            rel = relative(self._root, event.dest_path if source == "move" else event.src_path)
            if rel is not None:
                self._on_path(rel, source)
        except Exception:  # an exception here would kill watchdog's dispatcher thread for good
            log.exception("watch_handler_failed")


_SOURCES: dict[type[FileSystemEvent], str] = {FileModifiedEvent: "modify", FileClosedEvent: "close",
                                               FileCreatedEvent: "create", FileMovedEvent: "move"}


class Watcher:
    """Watches one root recursively; inotify when possible, polling when not."""

    def __init__(
        self,
        root: Path,
        *,
        on_path: OnPath,
        on_dir: Callable[[bytes], None],
        on_overflow: Callable[[], None],
        force_polling: bool = False,
    ) -> None:
        self.root = root
        self._on_dir = on_dir
        self._new_dirs: set[bytes] = set()  # folders created since the last coverage check
        self._dirs_lock = threading.Lock()
        self._on_path = on_path
        self._on_overflow = on_overflow
        self._handler = _Handler(root, on_path, self._dir_seen)
        self._force_polling = force_polling
        self._observer: BaseObserver | InotifyTree | None = None
        self.mode = "none"
        self.degraded_reason = ""
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start watching (creating the root if missing); fall back to polling if inotify is unavailable."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._observer = self._start_observer()

    def _start_observer(self) -> BaseObserver | InotifyTree:
        if not self._force_polling:
            try:
                tree = InotifyTree(os.fsencode(self.root), on_path=self._on_path, on_dir=self._dir_seen,
                                   on_overflow=self._on_overflow)
                tree.start()
                gap = self._first_unwatched(folders_below(os.fsencode(self.root)), recheck=True)
                if gap is None:
                    self.mode, self.degraded_reason = "inotify", ""
                    return tree
                tree.stop()
                self.degrade_to_polling(gap)
                log.warning("watcher_degraded", mode="polling", reason=self.degraded_reason, hint=LIMIT_HINT)
            except OSError as exc:
                errno_ = exc.errno
                reason = os.strerror(errno_) if errno_ else str(exc)
                # inotify says ENOSPC for its watch limit and EMFILE for its instance limit (inotify(7))
                limit = {errno.ENOSPC: "inotify watch limit reached", errno.EMFILE: "inotify instance limit reached"}
                self.degraded_reason = f"{limit.get(errno_ or 0, 'inotify unavailable')}: {reason}"
                log.warning("watcher_degraded", mode="polling", reason=self.degraded_reason)
        observer = PollingObserver(timeout=POLL_INTERVAL_S)
        observer.schedule(self._handler, str(self.root), recursive=True, event_filter=EVENT_FILTER)
        observer.start()
        self.mode = "polling"
        return observer

    # -- coverage: the watch limit skips subfolders silently (FIELD-NOTES §1) ------------------------------

    def _dir_seen(self, rel: bytes) -> None:
        with self._dirs_lock:  # on the reader's thread: O(1)
            self._new_dirs.add(rel)
        self._on_dir(rel)

    def coverage_gap(self) -> bytes | None:
        """A folder created since the last call that inotify does not watch (the watch limit was reached and
        watchdog skipped it without a word); None if every one is watched, or the kernel cannot tell."""
        with self._dirs_lock:
            new, self._new_dirs = self._new_dirs, set()
        with self._lock:
            tree = self._observer if isinstance(self._observer, InotifyTree) else None
        if tree is not None and tree.unwatched is not None:
            return tree.unwatched  # the kernel said so when the watch was added
        if self.mode != "inotify" or not new:
            return None
        root = os.fsencode(self.root)
        return self._first_unwatched(os.path.join(root, rel) for rel in sorted(new))

    def degrade_to_polling(self, gap: bytes) -> None:
        """Use the polling observer from the next (re)start on, because ``gap`` (relative) is not watched."""
        self._force_polling = True
        shown = os.fsdecode(gap) or "."
        self.degraded_reason = f"inotify watch limit reached: folder {shown!r} is not watched"

    def _first_unwatched(self, folders: Iterable[bytes], *, recheck: bool = False) -> bytes | None:
        watched = watched_dirs()
        if watched is None:
            return None
        for folder in folders:
            try:
                st = os.stat(folder, follow_symlinks=False)
            except OSError:
                continue  # gone again
            if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in watched:
                if recheck:
                    time.sleep(RECHECK_S)
                    return self._first_unwatched([folder])
                return relative(self.root, folder) or b""
        return None

    def restart(self) -> None:
        """Tear the observer down and build a new one (after the root vanished or a thread died)."""
        self.stop()
        self.start()
        log.info("watcher_restarted", mode=self.mode)

    def is_alive(self) -> bool:
        """True while the observer thread runs (necessary, not sufficient: see the canary in health)."""
        with self._lock:
            return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        """Stop watching and wait for watchdog's threads."""
        with self._lock:
            observer, self._observer = self._observer, None
        if isinstance(observer, InotifyTree):
            observer.stop()
        elif observer is not None:
            observer.stop()
            observer.join(timeout=5)
