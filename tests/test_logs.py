"""Tests for sidecar.logs: real lines rendered into a StringIO stream and parsed back."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
import structlog

from sidecar.logs import REDACTED, RateLimitedLog, configure_logging

Lines = Callable[[], list[dict[str, Any]]]
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


class TtyStream(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _parse(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


@pytest.fixture
def lines() -> Lines:
    """Configure JSON logging into a fresh stream; calling the result parses what was written so far."""
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    return lambda: _parse(stream)


def test_json_line_has_standard_fields(lines: Lines) -> None:
    """A structlog event becomes one JSON line with timestamp, level, event, logger and its fields."""
    structlog.get_logger("sidecar.uploader").info("upload_succeeded", key="pod/a.png", bytes=123, attempt=1)
    (line,) = lines()
    assert ISO_UTC.match(line["timestamp"]), line["timestamp"]
    assert line["level"] == "info"
    assert line["event"] == "upload_succeeded"
    assert line["logger"] == "sidecar.uploader"
    assert (line["key"], line["bytes"], line["attempt"]) == ("pod/a.png", 123, 1)
    assert list(line)[:4] == ["timestamp", "level", "event", "logger"]


def test_context_variables_are_merged(lines: Lines) -> None:
    """Values bound with structlog.contextvars appear on every line logged inside the context."""
    log = structlog.get_logger("sidecar.test")
    with structlog.contextvars.bound_contextvars(worker=3):
        log.info("inside")
    log.info("outside")
    inside, outside = lines()
    assert inside["worker"] == 3
    assert "worker" not in outside


def test_exception_becomes_dict_traceback(lines: Lines) -> None:
    """log.exception renders the exception as structured data, without local variables."""
    secret_local = "do-not-print"  # noqa: F841 - a local that must not leak into the traceback
    try:
        raise ValueError("bad thing")
    except ValueError:
        structlog.get_logger("sidecar.test").exception("upload_failed", key="k")
    (line,) = lines()
    assert line["level"] == "error"
    (exc,) = line["exception"]
    assert (exc["exc_type"], exc["exc_value"]) == ("ValueError", "bad thing")
    assert exc["frames"]
    assert "do-not-print" not in json.dumps(line)


def test_stdlib_watchdog_warning_is_json(lines: Lines) -> None:
    """A stdlib record from watchdog's inotify logger comes out as a JSON line with the same fields."""
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed")
    (line,) = lines()
    assert line["event"] == "Inotify queue overflowed"
    assert line["level"] == "warning"
    assert line["logger"] == "watchdog.observers.inotify_c"
    assert ISO_UTC.match(line["timestamp"])


def test_stdlib_args_extra_and_exceptions(lines: Lines) -> None:
    """Stdlib %-args are formatted, extra= fields kept and exc_info rendered as a dict traceback."""
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        logging.getLogger("some.lib").exception("write %s failed", "x", extra={"errno_": 28})
    (line,) = lines()
    assert line["event"] == "write x failed"
    assert line["errno_"] == 28
    assert line["exception"][0]["exc_type"] == "OSError"


def test_botocore_and_urllib3_only_warn(lines: Lines) -> None:
    """botocore and urllib3 INFO lines are dropped, their warnings kept."""
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTPS connection")
    logging.getLogger("urllib3.connectionpool").warning("Retrying")
    assert [line["event"] for line in lines()] == ["Retrying"]


def test_level_filters_debug(lines: Lines) -> None:
    """At INFO, DEBUG lines from structlog and stdlib are not written."""
    structlog.get_logger("sidecar.test").debug("noisy")
    logging.getLogger("watchdog").debug("noisy too")
    structlog.get_logger("sidecar.test").info("kept")
    assert [line["event"] for line in lines()] == ["kept"]


def test_reconfiguring_replaces_the_handler() -> None:
    """Calling configure_logging again sends lines only to the new stream, once each."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", first)
    configure_logging("DEBUG", "json", second)
    structlog.get_logger("sidecar.test").debug("only_here")
    logging.getLogger("watchdog").debug("stdlib too")
    assert first.getvalue() == ""
    assert [line["event"] for line in _parse(second)] == ["only_here", "stdlib too"]


def test_logger_created_before_configuration_follows_it() -> None:
    """A module-level logger made before configure_logging writes where the latest call says."""
    log = structlog.get_logger("sidecar.early")
    configure_logging("INFO", "json", io.StringIO())
    log.info("first")
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    log.info("second")
    assert [line["event"] for line in _parse(stream)] == ["second"]


def test_auto_format_is_json_off_a_tty() -> None:
    """fmt='auto' renders JSON when the stream is not a terminal."""
    stream = io.StringIO()
    configure_logging("INFO", "auto", stream)
    structlog.get_logger("sidecar.test").info("plain", n=1)
    assert _parse(stream)[0]["event"] == "plain"


def test_auto_format_is_console_on_a_tty() -> None:
    """fmt='auto' renders human-readable console lines when the stream is a terminal."""
    stream = TtyStream()
    configure_logging("INFO", "auto", stream)
    structlog.get_logger("sidecar.test").info("pretty_event", n=1)
    text = stream.getvalue()
    assert "pretty_event" in text
    assert not text.lstrip().startswith("{")


def test_console_format_without_tty_has_no_colour_codes() -> None:
    """fmt='console' on a non-terminal writes console lines without ANSI escapes."""
    stream = io.StringIO()
    configure_logging("INFO", "console", stream)
    structlog.get_logger("sidecar.test").info("console_event", secret_access_key="abc")
    text = stream.getvalue()
    assert "console_event" in text
    assert "\x1b[" not in text
    assert "abc" not in text


def test_invalid_level_and_format_are_refused() -> None:
    """An unknown level or format raises ValueError naming the allowed values."""
    with pytest.raises(ValueError, match="DEBUG, INFO"):
        configure_logging("LOUD", "json", io.StringIO())
    with pytest.raises(ValueError, match="auto, json, console"):
        configure_logging("INFO", "xml", io.StringIO())


def test_secret_keys_are_redacted(lines: Lines) -> None:
    """Values of secret-looking keys are masked at any nesting depth, other fields are untouched."""
    headers = {"Authorization": "Bearer abc", "Host": "example"}
    structlog.get_logger("sidecar.test").info(
        "config_loaded",
        secret_access_key="s3cr3t",
        ACCESS_KEY_ID="AKIA",
        http_token="t0k",
        db_password="pw",
        headers=headers,
        key="pod/file.png",
    )
    (line,) = lines()
    for name in ("secret_access_key", "ACCESS_KEY_ID", "http_token", "db_password"):
        assert line[name] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "Host": "example"}
    assert line["key"] == "pod/file.png"
    assert headers["Authorization"] == "Bearer abc", "the caller's dict must not be modified"
    for value in ("s3cr3t", "AKIA", "t0k", "abc"):
        assert value not in json.dumps(line)


def test_secret_keys_stay_redacted_on_every_line(lines: Lines) -> None:
    """The verdict per field name is remembered (the scan was half a line's cost): the second and later lines
    with the same secret-looking names are masked too, and a plain name stays plain."""
    log = structlog.get_logger("sidecar.test")
    for n in range(3):
        log.info("again", upload_token=f"tok{n}", nested={"Password": f"pw{n}", "size": n}, path=f"p{n}")
    got = lines()
    assert [(x["upload_token"], x["nested"], x["path"]) for x in got] == [
        (REDACTED, {"Password": REDACTED, "size": n}, f"p{n}") for n in range(3)]


def test_stdlib_extra_secrets_are_redacted(lines: Lines) -> None:
    """Secret-looking extra= fields of stdlib records are masked too."""
    logging.getLogger("some.lib").warning("signing", extra={"aws_secret": "zzz"})
    (line,) = lines()
    assert line["aws_secret"] == REDACTED


def _events(lines: Lines) -> list[tuple[str, int | None]]:
    return [(line["event"], line.get("suppressed")) for line in lines()]


def test_rate_limited_first_error_then_suppressed(lines: Lines) -> None:
    """The first error is logged; repeats within the interval are suppressed and counted."""
    clock = FakeClock()
    limited = RateLimitedLog(structlog.get_logger("sidecar.test"), interval_s=60, clock=clock)
    assert limited.error("store_unreachable", error="ConnectTimeout")
    for _ in range(5):
        clock.now += 10
        assert not limited.error("store_unreachable", error="ConnectTimeout")
    assert _events(lines) == [("store_unreachable", None)]


def test_rate_limited_next_line_carries_suppressed_count(lines: Lines) -> None:
    """After the interval the next error is logged with suppressed=N, and the count starts over."""
    clock = FakeClock()
    limited = RateLimitedLog(structlog.get_logger("sidecar.test"), interval_s=60, clock=clock)
    limited.error("store_unreachable")
    for _ in range(3):
        clock.now += 15
        limited.error("store_unreachable")
    clock.now += 15  # 60 s after the first line
    assert limited.error("store_unreachable", attempt=5)
    clock.now += 60
    assert limited.error("store_unreachable")
    logged = lines()
    assert [(line["event"], line.get("suppressed")) for line in logged] == [
        ("store_unreachable", None), ("store_unreachable", 3), ("store_unreachable", None),
    ]
    assert logged[1]["attempt"] == 5
    assert logged[1]["level"] == "error"


def test_rate_limited_events_are_independent(lines: Lines) -> None:
    """Different event names are limited separately."""
    limited = RateLimitedLog(structlog.get_logger("sidecar.test"), interval_s=60, clock=FakeClock())
    assert limited.error("store_unreachable")
    assert limited.error("journal_locked")
    assert not limited.error("store_unreachable")
    assert _events(lines) == [("store_unreachable", None), ("journal_locked", None)]


def test_recovered_logs_once_after_errors(lines: Lines) -> None:
    """recovered() logs one INFO line with the outage's error count and duration, then nothing more."""
    clock = FakeClock()
    limited = RateLimitedLog(structlog.get_logger("sidecar.test"), interval_s=60, clock=clock)
    limited.error("store_unreachable")
    clock.now += 30
    limited.error("store_unreachable")
    clock.now += 12.5
    assert limited.recovered("store_reachable_again", endpoint="r2")
    assert not limited.recovered("store_reachable_again")
    last = lines()[-1]
    assert (last["event"], last["level"], last["endpoint"]) == ("store_reachable_again", "info", "r2")
    assert (last["errors"], last["outage_s"], last["suppressed"]) == (2, 42.5, 1)
    assert len(lines()) == 2


def test_recovered_is_silent_without_errors(lines: Lines) -> None:
    """recovered() logs nothing when no error was logged, so a healthy loop can call it every pass."""
    limited = RateLimitedLog(structlog.get_logger("sidecar.test"), interval_s=60, clock=FakeClock())
    assert not limited.recovered("store_reachable_again")
    assert lines() == []


def test_error_after_recovery_is_logged_at_once(lines: Lines) -> None:
    """A new outage right after a recovery logs its first error immediately."""
    limited = RateLimitedLog(structlog.get_logger("sidecar.test"), interval_s=60, clock=FakeClock())
    limited.error("store_unreachable")
    limited.recovered("store_reachable_again")
    assert limited.error("store_unreachable")
    assert [line["event"] for line in lines()] == [
        "store_unreachable", "store_reachable_again", "store_unreachable",
    ]


def test_rate_limited_rejects_negative_interval() -> None:
    """A negative interval is refused at construction."""
    with pytest.raises(ValueError, match="interval_s"):
        RateLimitedLog(structlog.get_logger("sidecar.test"), interval_s=-1)
