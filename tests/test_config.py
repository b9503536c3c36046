"""Settings: parsing, validation and the one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.config import load_settings
from sidecar.errors import ConfigError

SECRET = "MARKER-SECRET-4f1c9"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)


def test_defaults_fit_a_runpod_pod() -> None:
    """Without configuration the daemon watches /workspace/outputs and journals on the volume disk."""
    s = load_settings()
    assert s.watch_dir == Path("/workspace/outputs")
    assert s.journal_path == Path("/workspace/.sidecar/journal.sqlite3")
    assert s.http_port == 9188 and s.drain_timeout_s == 4.0 and s.workers == 4
    assert s.multipart_threshold == 64 * 1024 * 1024


def test_comma_lists_and_extensions_are_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists come from comma-separated env values; extensions lose dots and case."""
    monkeypatch.setenv("SIDECAR_EXTENSIONS", ".PNG, webp,,")
    monkeypatch.setenv("SIDECAR_EXCLUDE", "*/thumbs/*,*_preview.png")
    s = load_settings()
    assert s.extensions == ["png", "webp"]
    assert s.exclude == ["*/thumbs/*", "*_preview.png"]


def test_r2_account_id_builds_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """An account id becomes R2's endpoint URL."""
    monkeypatch.setenv("SIDECAR_R2_ACCOUNT_ID", "abc123")
    assert load_settings().resolved_endpoint == "https://abc123.r2.cloudflarestorage.com"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SIDECAR_WORKERS", "0", "SIDECAR_WORKERS: Input should be greater than or equal to 1"),
        ("SIDECAR_HTTP_PORT", "99999", "SIDECAR_HTTP_PORT:"),
        ("SIDECAR_KEY_TEMPLATE", "{nope}/{relpath}", "SIDECAR_KEY_TEMPLATE: unknown or malformed placeholder"),
        ("SIDECAR_KEY_TEMPLATE", "{pod_id}/fixed", "must contain {relpath}"),
        ("SIDECAR_ENDPOINT_URL", "ftp://x", "SIDECAR_ENDPOINT_URL must start with http"),
        ("SIDECAR_SETTLE_S", "soon", "SIDECAR_SETTLE_S:"),
        ("SIDECAR_LOG_LEVEL", "LOUD", "SIDECAR_LOG_LEVEL:"),
    ],
)
def test_invalid_values_give_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    """Every invalid value raises ConfigError with one line that names the variable."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_secrets_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret never appears in the redacted config, its repr, or a validation error."""
    monkeypatch.setenv("SIDECAR_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("SIDECAR_HTTP_TOKEN", SECRET)
    s = load_settings()
    assert SECRET not in repr(s) and SECRET not in str(s.redacted())
    assert s.redacted()["secret_access_key"] == "**********"
    monkeypatch.setenv("SIDECAR_WORKERS", "-1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert SECRET not in str(info.value)


def test_bucket_is_required_only_where_needed() -> None:
    """Commands that talk to the store refuse to start without SIDECAR_BUCKET."""
    with pytest.raises(ConfigError, match="SIDECAR_BUCKET"):
        load_settings().require_bucket()
