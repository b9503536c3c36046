"""The filesystem watcher: turns watchdog events into candidate paths. Never imports boto3.

What the watcher must know (FIELD-NOTES §1): new subfolders deliver *created* events but no close events,
so created, closed and moved-to are all candidates; the handler must be O(1) because every handler runs on
one thread; an inotify queue overflow is reported only as a log record, which is hooked here to request a
rescan; and when inotify cannot be had (instance or watch limits) the watcher falls back to polling and
says so.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from sidecar.localfile import relative

log = structlog.get_logger("sidecar.watcher")

EVENT_FILTER = [FileClosedEvent, FileCreatedEvent, FileMovedEvent, DirMovedEvent, DirCreatedEvent]
WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")
POLL_INTERVAL_S = 2.0

OnPath = Callable[[bytes, str], None]


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, on_path: OnPath, on_dir: Callable[[bytes], None]) -> None:
        self._root = root
        self._on_path = on_path
        self._on_dir = on_dir

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if isinstance(event, DirMovedEvent | DirCreatedEvent):
                rel = relative(self._root, event.dest_path or event.src_path)
                if rel is not None:
                    self._on_dir(rel)
                return
            if isinstance(event, FileMovedEvent):
                path, source = event.dest_path, "move"
            elif isinstance(event, FileClosedEvent):
                path, source = event.src_path, "close"
            elif isinstance(event, FileCreatedEvent):
                path, source = event.src_path, "create"
            else:
                return
            rel = relative(self._root, path)
            if rel is not None:
                self._on_path(rel, source)
        except Exception:  # an exception here would kill watchdog's dispatcher thread for good
            log.exception("watch_handler_failed")


class _OverflowHook(logging.Handler):
    """Catches watchdog's 'Inotify queue overflowed' warning, the only sign that events were lost.

    watchdog 7.1 logs one overflow twice in a row on its reader thread (``inotify_c``: events were lost, then
    ``inotify``: reconciling watches); records from the same thread within ``SAME_OVERFLOW_S`` count once.
    """

    SAME_OVERFLOW_S = 0.1

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow
        self._last: tuple[int | None, float] = (None, -1.0)

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" not in record.getMessage().lower():
            return
        thread, at = self._last
        self._last = (record.thread, record.created)
        if thread == record.thread and record.created - at < self.SAME_OVERFLOW_S:
            return
        self._on_overflow()


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
        self._handler = _Handler(root, on_path, on_dir)
        self._hook = _OverflowHook(on_overflow)
        self._force_polling = force_polling
        self._observer: BaseObserver | None = None
        self.mode = "none"
        self.degraded_reason = ""
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start watching (creating the root if missing); fall back to polling if inotify is unavailable."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in WATCHDOG_LOGGERS:
            logger = logging.getLogger(name)
            if self._hook not in logger.handlers:
                logger.addHandler(self._hook)
            if logger.getEffectiveLevel() > logging.WARNING:
                logger.setLevel(logging.WARNING)
        with self._lock:
            self._observer = self._start_observer()

    def _start_observer(self) -> BaseObserver:
        if not self._force_polling:
            try:
                from watchdog.observers.inotify import InotifyObserver  # noqa: PLC0415 - Linux only

                observer: BaseObserver = InotifyObserver()
                observer.schedule(self._handler, str(self.root), recursive=True, event_filter=EVENT_FILTER)
                observer.start()
                self.mode, self.degraded_reason = "inotify", ""
                return observer
            except (OSError, ImportError) as exc:
                reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
                self.degraded_reason = f"inotify unavailable: {reason}"
                log.warning("watcher_degraded", mode="polling", reason=self.degraded_reason)
        observer = PollingObserver(timeout=POLL_INTERVAL_S)
        observer.schedule(self._handler, str(self.root), recursive=True, event_filter=EVENT_FILTER)
        observer.start()
        self.mode = "polling"
        return observer

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
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).removeHandler(self._hook)
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
