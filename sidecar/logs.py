"""Logging: structlog JSON lines on stdout, with the stdlib ``logging`` records rendered the same way.

:func:`configure_logging` is the only place that touches global logging state; call it once from the
composition root (tests call it again freely, it replaces what it installed before). Every line carries
``timestamp`` (ISO-8601 UTC), ``level``, ``event`` (a stable snake_case name), ``logger`` and the event's
fields; secrets are masked by :func:`redact` before rendering.

:class:`RateLimitedLog` keeps a long outage from flooding the log: the first error is logged, repeats of
the same event are counted and folded into the next emitted line, and recovery is logged once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "**********"
SECRET_MARKERS = ("secret", "token", "password", "authorization", "access_key")
FORMATS = ("auto", "json", "console")
LEADING_KEYS = ("timestamp", "level", "event", "logger")
# Chatty libraries whose DEBUG/INFO lines (request dumps, connection pool churn) are noise or may carry
# signed headers; only their warnings reach our log.
QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "waitress")

_handler_lock = threading.Lock()
_installed_handler: logging.Handler | None = None


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace the value of every key that looks like a secret (also in nested dicts) with asterisks."""
    _redact_mapping(event_dict)
    return event_dict


_secret_keys: dict[str, bool] = {}  # field name -> looks like a secret; field names are few, so remembered
_SECRET_KEYS_MAX = 4096
_PLAIN = frozenset({str, int, float, bool, type(None)})  # values that cannot hold a nested mapping


def _is_secret_key(key: object) -> bool:
    text = str(key)
    secret = _secret_keys.get(text)
    if secret is None:
        secret = any(marker in text.lower() for marker in SECRET_MARKERS)
        if len(_secret_keys) < _SECRET_KEYS_MAX:
            _secret_keys[text] = secret
    return secret


def _redact_mapping(mapping: MutableMapping[str, Any]) -> None:
    # Every line passes here: the per-key marker scan and the ABC check were half the cost of a log line.
    for key, value in mapping.items():
        if _is_secret_key(key):
            mapping[key] = REDACTED
        elif type(value) not in _PLAIN and isinstance(value, MutableMapping):
            mapping[key] = dict(value)  # never mutate a caller's dict that happens to be logged
            _redact_mapping(mapping[key])


def _shared_processors() -> list[Processor]:
    """Processors run on structlog events and on foreign (stdlib) records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
        redact,
    ]


def _leading_keys_first(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Put ``timestamp level event logger`` first so a line reads left to right; fields keep their order."""
    head = {key: event_dict.pop(key) for key in LEADING_KEYS if key in event_dict}
    return {**head, **event_dict}


def _renderer_chain(console: bool, colors: bool) -> list[Processor]:
    if console:
        # Plain tracebacks: rich's pretty ones print local variables, which may hold credentials.
        return [
            structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)
        ]
    # Locals stay out of JSON tracebacks for the same reason.
    tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    return [tracebacks, _leading_keys_first, structlog.processors.JSONRenderer(sort_keys=False)]


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _wants_console(fmt: str, stream: TextIO) -> bool:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt == "console" or (fmt == "auto" and _is_tty(stream))


def _level_number(level: str) -> int:
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
    return number


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send structlog and stdlib logging to ``stream`` (stdout) as JSON lines, or console lines on a TTY.

    Idempotent: a second call replaces the handler the first one installed and leaves other handlers
    (pytest's, a watcher's overflow hook) alone.
    """
    global _installed_handler  # noqa: PLW0603 - logging is process-global state by nature
    out = stream if stream is not None else sys.stdout
    console = _wants_console(fmt, out)
    number = _level_number(level)
    shared = _shared_processors()

    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *_renderer_chain(console, colors=_is_tty(out)),
            ],
        )
    )
    root = logging.getLogger()
    with _handler_lock:
        if _installed_handler is not None:
            root.removeHandler(_installed_handler)
        root.addHandler(handler)
        _installed_handler = handler
        root.setLevel(number)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(number, logging.WARNING))

    # The sidecar's own events are rendered once and written straight to the handler's stream (a line through
    # stdlib logging cost ~120 us: a LogRecord and a second formatter pass), filtered by level before any work.
    structlog.configure(
        processors=[*shared, *_renderer_chain(console, colors=_is_tty(out))],
        logger_factory=_LineLoggerFactory(handler),
        wrapper_class=structlog.make_filtering_bound_logger(number),
        # Not cached: a logger used before configure_logging (or in an earlier test) must still follow
        # the current configuration.
        cache_logger_on_first_use=False,
    )


class _LineLogger:
    """What structlog hands our rendered events to: one line on the stdlib handler's stream, under that
    handler's lock, so a line of ours and one of a library's never interleave."""

    def __init__(self, name: str, handler: logging.StreamHandler[TextIO]) -> None:
        self.name = name  # read by structlog.stdlib.add_logger_name
        self._handler = handler

    def msg(self, message: str) -> None:
        self._handler.acquire()
        try:
            self._handler.stream.write(message + "\n")
            self._handler.stream.flush()
        finally:
            self._handler.release()

    debug = info = warning = warn = error = exception = critical = fatal = log = msg


class _LineLoggerFactory:
    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self._handler = handler

    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger(str(args[0]) if args else "", self._handler)


class _ErrorLogger(Protocol):
    def error(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def info(self, event: str, *args: Any, **kw: Any) -> Any: ...


@dataclass
class _Streak:
    first_at: float
    last_emitted_at: float
    errors: int = 1
    suppressed: int = 0


class RateLimitedLog:
    """Logs the first error of a streak, then at most one line per event per ``interval_s``.

    Repeats inside the interval are counted; the next emitted line carries ``suppressed=N``. Use one
    instance per failing thing (the store, the watcher): :meth:`recovered` ends every streak it tracks.
    """

    def __init__(
        self, logger: _ErrorLogger, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, not {interval_s}")
        self._logger = logger
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._streaks: dict[str, _Streak] = {}

    def error(self, event: str, **fields: Any) -> bool:
        """Log ``event`` at ERROR unless it was logged less than ``interval_s`` ago; True if emitted."""
        now = self._clock()
        with self._lock:
            streak = self._streaks.get(event)
            if streak is None:
                self._streaks[event] = _Streak(first_at=now, last_emitted_at=now)
                suppressed = 0
            else:
                streak.errors += 1
                if now - streak.last_emitted_at < self._interval:
                    streak.suppressed += 1
                    return False
                suppressed, streak.suppressed, streak.last_emitted_at = streak.suppressed, 0, now
        if suppressed:
            fields["suppressed"] = suppressed
        self._logger.error(event, **fields)
        return True

    def recovered(self, event: str, **fields: Any) -> bool:
        """Log ``event`` at INFO once if errors were logged since the last recovery; True if emitted.

        Adds ``errors`` (the streak's total, suppressed included), ``outage_s`` and, if some repeats were
        never shown, ``suppressed``.
        """
        now = self._clock()
        with self._lock:
            streaks, self._streaks = self._streaks, {}
        if not streaks:
            return False
        fields["errors"] = sum(s.errors for s in streaks.values())
        fields["outage_s"] = round(now - min(s.first_at for s in streaks.values()), 3)
        suppressed = sum(s.suppressed for s in streaks.values())
        if suppressed:
            fields["suppressed"] = suppressed
        self._logger.info(event, **fields)
        return True
