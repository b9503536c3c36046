"""A recursive inotify watch of one tree, read on one thread: the watcher's event path (see sidecar.watcher).

watchdog's inotify observer moves every event through three threads (its reader, its emitter, its
dispatcher), building event objects on the way; measured at ~0.4 ms of CPU per event, and a PIL PNG of
2.6 MB produces ~40 modify events. Here one thread reads the kernel's buffer (many events per ``read``),
decodes each event and calls the handler directly: the same facts, without the hand-offs.

What it reports, in watchdog's vocabulary so the settler's decision table is unchanged:
``modify`` (IN_MODIFY), ``close`` (IN_CLOSE_WRITE), ``create`` (IN_CREATE, or a file moved in from outside
the tree, or a file found in a new folder), ``move`` (IN_MOVED_TO of a file renamed inside the tree,
reported under its new name); a new or moved-in folder is watched, its files reported as created (those
written before the watch get no events of their own), and then the folder itself, for the caller to scan;
a queue overflow re-adds every watch and then is reported. The watch of a folder is
added before its subfolders are listed, so a folder made meanwhile is seen by one or the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable

import structlog

log = structlog.get_logger("sidecar.inotify")

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT = 0x100, 0x400, 0x800, 0x2000
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_DONT_FOLLOW = 0x4000, 0x8000, 0x01000000, 0x02000000
IN_EXCL_UNLINK, IN_ISDIR = 0x04000000, 0x40000000
IN_CLOEXEC, IN_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK  # inotify_init1(2): the same values as open(2)'s
MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
        | IN_ONLYDIR | IN_EXCL_UNLINK)
LEAF_LINKS = 2  # a folder's own name and its "." entry: no subfolder links to it with ".."
HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
READ_SIZE = 64 * 1024
MOVES_REMEMBERED = 256  # cookies of files renamed away, to tell a rename inside the tree from a move in

OnPath = Callable[[bytes, str], None]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def _checked(result: int, what: str, path: bytes = b"") -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fsdecode(path) if path else what)
    return result


def join(folder: bytes, name: bytes) -> bytes:
    return folder + b"/" + name if folder else name


class InotifyTree:
    """Watches ``root`` and every folder below it; events are handled on the thread :meth:`start` begins.

    ``on_path(rel, source)`` and ``on_dir(rel)`` get paths relative to the root; ``on_overflow()`` is called
    after the kernel dropped events. The handlers run on the reader thread and must be O(1).
    """

    def __init__(self, root: bytes, *, on_path: OnPath, on_dir: Callable[[bytes], None],
                 on_overflow: Callable[[], None]) -> None:
        self._root = root
        self._on_path = on_path
        self._on_dir = on_dir
        self._on_overflow = on_overflow
        self._fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._folders: dict[int, bytes] = {}  # watch descriptor -> folder relative to the root
        self._root_wd = -1
        self._moved_files: OrderedDict[int, None] = OrderedDict()
        self.unwatched: bytes | None = None  # the first folder the watch limit refused, relative
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watch the whole tree, then read events on a new thread. Raises OSError (EMFILE: the instance
        limit; ENOSPC: the watch limit) with nothing left open."""
        self._fd = _checked(_libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK), "inotify_init1")
        try:
            self._root_wd = self._watch(b"", root=True)
            self._watch_below(b"", strict=True)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            self._close()
            raise
        self._thread = threading.Thread(target=self._run, name="sidecar-inotify", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """End the reader thread and close the inotify instance (its watches go with it)."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._close()

    def _close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1

    # -- watches ---------------------------------------------------------------------------------------

    def _watch(self, rel: bytes, *, root: bool = False) -> int:
        path = join(self._root, rel) if rel else self._root
        mask = MASK if root else MASK | IN_DONT_FOLLOW  # a configured root may be a symlink; nothing below it
        wd = _checked(_libc.inotify_add_watch(self._fd, path, mask), "inotify_add_watch", path)
        self._folders[wd] = rel
        return wd

    def _watch_below(self, top: bytes, *, strict: bool = False, report: bool = False) -> None:
        """Add a watch to every folder below ``top`` (already watched), each before it is listed.

        A folder whose link count is 2 has no subfolders (ext4, xfs, tmpfs count them; btrfs and some FUSE
        folders report 1 and are listed), so a tree of leaf folders full of files costs no listing, unless
        ``report``: then every entry that is not a folder is reported as created, as watchdog does for a new
        folder (its files may have been written, even closed, before its watch existed). At the watch limit
        ``strict`` raises; otherwise the folder is remembered in ``unwatched`` for the caller.
        """
        stack = [top]
        while stack:
            rel = stack.pop()
            path = join(self._root, rel) if rel else self._root
            try:
                if not report and os.stat(path, follow_symlinks=False).st_nlink == LEAF_LINKS:
                    continue
                with os.scandir(path) as entries:
                    listed = [(join(rel, e.name), e.is_dir(follow_symlinks=False)) for e in entries]
            except OSError:
                continue  # gone again, or unreadable
            for sub, is_dir in listed:
                if not is_dir:
                    if report:
                        self._on_path(sub, "create")
                    continue
                try:
                    self._watch(sub)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        if strict:
                            raise
                        self.unwatched = self.unwatched if self.unwatched is not None else sub
                    continue  # ENOENT, ENOTDIR (replaced by a file), ELOOP (a symlink now): nothing to watch
                stack.append(sub)

    def _added(self, rel: bytes) -> None:
        """A folder appeared below the root (made, or moved here): watch it and its subtree, then report it."""
        try:
            self._watch(rel)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and self.unwatched is None:
                self.unwatched = rel
            if exc.errno == errno.ENOSPC or not os.path.isdir(join(self._root, rel)):
                return
        else:
            self._watch_below(rel, report=True)
        self._on_dir(rel)

    def _forget(self, rel: bytes) -> None:
        """A folder left its place (renamed or moved out): drop the watches of its subtree."""
        below = rel + b"/"
        for wd in [wd for wd, folder in self._folders.items() if folder == rel or folder.startswith(below)]:
            del self._folders[wd]
            with contextlib.suppress(OSError):
                _checked(_libc.inotify_rm_watch(self._fd, wd), "inotify_rm_watch")

    # -- reading ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                try:
                    data = os.read(self._fd, READ_SIZE)
                except BlockingIOError:
                    continue
                if not self._handle(data):
                    log.warning("watch_root_gone", path=os.fsdecode(self._root))
                    return  # the root was deleted, moved or unmounted: is_alive() turns False, the daemon rebuilds
        except Exception:  # a bug here must not pass for a watcher that works: the thread ends, health sees it
            log.exception("watch_reader_failed")

    def _handle(self, data: bytes) -> bool:
        """Dispatch every event in one read; False once the root itself is gone."""
        offset, end = 0, len(data)
        folders, on_path = self._folders, self._on_path
        while offset < end:
            wd, mask, cookie, length = HEADER.unpack_from(data, offset)
            start = offset + HEADER.size
            offset = start + length
            folder = folders.get(wd)
            try:
                if folder is None:
                    if mask & IN_Q_OVERFLOW:
                        self._overflowed()
                    continue  # a watch dropped already (its folder moved away): that folder is scanned anew
                name = data[start:offset].split(b"\0", 1)[0]
                if mask & IN_MODIFY:  # most frequent first: ~40 per PNG
                    if not mask & IN_ISDIR:
                        on_path(join(folder, name), "modify")
                elif mask & IN_CLOSE_WRITE:
                    on_path(join(folder, name), "close")
                elif not self._rarer(wd, join(folder, name), mask, cookie):
                    return False
            except Exception:  # one bad event must not end the reader: the next ones are still read
                log.exception("watch_handler_failed", wd=wd, mask=hex(mask))
        return True

    def _rarer(self, wd: int, rel: bytes, mask: int, cookie: int) -> bool:
        """Every event but modify and close (``rel``: the watched folder joined with the event's name, which
        is empty for events on the folder itself); False when the root is gone."""
        if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            if wd == self._root_wd:
                return False
            if mask & IN_IGNORED:
                del self._folders[wd]
        elif mask & IN_ISDIR:
            if mask & IN_MOVED_FROM:
                self._forget(rel)
            elif mask & (IN_CREATE | IN_MOVED_TO):
                self._added(rel)
        elif mask & IN_CREATE:
            self._on_path(rel, "create")
        elif mask & IN_MOVED_TO:
            renamed = cookie in self._moved_files
            if renamed:
                del self._moved_files[cookie]
            self._on_path(rel, "move" if renamed else "create")
        elif mask & IN_MOVED_FROM:
            self._moved_files[cookie] = None
            if len(self._moved_files) > MOVES_REMEMBERED:
                self._moved_files.popitem(last=False)
        return True

    def _overflowed(self) -> None:
        """The kernel dropped events: folders made meanwhile may be unwatched. Watch everything again
        (a folder watched already keeps its descriptor), then let the caller rescan."""
        self._watch_below(b"")
        self._on_overflow()
