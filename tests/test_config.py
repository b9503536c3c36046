"""Settings: parsing, validation and the one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
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
    monkeypatch.setenv("SIDECAR_R2_ACCOUNT_ID", "0123456789abcdef0123456789abcdef")
    assert load_settings().resolved_endpoint == "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SIDECAR_WORKERS", "0", "SIDECAR_WORKERS: Input should be greater than or equal to 1"),
        ("SIDECAR_HTTP_PORT", "99999", "SIDECAR_HTTP_PORT:"),
        ("SIDECAR_KEY_TEMPLATE", "{nope}/{relpath}", "SIDECAR_KEY_TEMPLATE: unknown or malformed placeholder"),
        ("SIDECAR_KEY_TEMPLATE", "{pod_id}/fixed", "must contain {relpath}"),
        ("SIDECAR_ENDPOINT_URL", "ftp://x", "SIDECAR_ENDPOINT_URL: must start with http"),
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


GOOD = {"SIDECAR_BUCKET": "b", "SIDECAR_ENDPOINT_URL": "http://127.0.0.1:9",
        "SIDECAR_WATCH_DIR": "/tmp/sidecar-cfg/out", "SIDECAR_STATE_DIR": "/tmp/sidecar-cfg/state"}
HOST = "SIDECAR_ENDPOINT_URL: needs a host name, and no spaces"
BAD_URL = "SIDECAR_ENDPOINT_URL: is not a valid URL (check the port, and brackets around an IPv6 address)"


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"SIDECAR_ENDPOINT_URL": "http://"}, HOST),
        ({"SIDECAR_ENDPOINT_URL": "https://"}, HOST),
        ({"SIDECAR_ENDPOINT_URL": "http://my host:9000"}, HOST),
        ({"SIDECAR_ENDPOINT_URL": "http://[::1"}, BAD_URL),
        ({"SIDECAR_ENDPOINT_URL": "http://127.0.0.1:abc"}, BAD_URL),
        ({"SIDECAR_ENDPOINT_URL": "http://admin:hunter2@minio:9000"},
         "SIDECAR_ENDPOINT_URL: must not carry a user or password (use SIDECAR_ACCESS_KEY_ID / "
         "SIDECAR_SECRET_ACCESS_KEY)"),
        ({"SIDECAR_ENDPOINT_URL": "s3.example.com"}, "SIDECAR_ENDPOINT_URL: must start with http:// or https://"),
        ({"SIDECAR_ENDPOINT_URL": "", "SIDECAR_R2_ACCOUNT_ID": "abc def"},
         "SIDECAR_R2_ACCOUNT_ID: must be the account id from the Cloudflare dashboard (letters, digits, '-') "
         "(got 'abc def')"),
        ({"SIDECAR_REGION": "US East"}, "SIDECAR_REGION: must be a region name like 'auto' (R2) or 'us-east-1' "
         "(lower case, digits, '-') (got 'US East')"),
        ({"SIDECAR_ENDPOINT_URL": ""}, "SIDECAR_R2_ACCOUNT_ID: required with SIDECAR_BUCKET (or SIDECAR_ENDPOINT_URL "
         "for another S3 store; for AWS itself https://s3.<region>.amazonaws.com)"),
        ({"SIDECAR_DISK_MIN_FREE": "ten"}, "SIDECAR_DISK_MIN_FREE: must be a size (5G, 512MiB, bytes) or a "
         "percentage of the filesystem (10%) (got 'ten')"),
        ({"SIDECAR_DISK_MIN_FREE": "150%"}, "SIDECAR_DISK_MIN_FREE: a percentage must be between 0 and 100 "
         "(exclusive) (got '150%')"),
        ({"SIDECAR_KEEP_MAX_BYTES": "0"}, "SIDECAR_KEEP_MAX_BYTES: must be more than 0 bytes (got '0')"),
        ({"SIDECAR_KEEP_MAX_BYTES": "lots"}, "SIDECAR_KEEP_MAX_BYTES: must be a size in bytes, optionally with a "
         "unit: 5368709120, 5G, 5GiB, 512M (got 'lots')"),
        ({"SIDECAR_DELETE_AFTER_S": "-1"}, "SIDECAR_DELETE_AFTER_S: Input should be greater than or equal to 0 "
         "(got '-1')"),
        ({"SIDECAR_RETENTION_RATE": "0"}, "SIDECAR_RETENTION_RATE: Input should be greater than 0 (got '0')"),
        ({"SIDECAR_STORAGE_CLASS": "GLACIER", "SIDECAR_ENDPOINT_URL": "", "SIDECAR_R2_ACCOUNT_ID": "abc"},
         "SIDECAR_STORAGE_CLASS: 'GLACIER' is not a storage class R2 accepts: STANDARD, STANDARD_IA"),
        ({"SIDECAR_STORAGE_CLASS": "FAST"}, "SIDECAR_STORAGE_CLASS: 'FAST' is not a storage class S3 accepts: "
         "STANDARD, REDUCED_REDUNDANCY, STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER, DEEP_ARCHIVE, "
         "GLACIER_IR, OUTPOSTS, EXPRESS_ONEZONE, SNOW"),
        ({"SIDECAR_METADATA": "Tenant Name=acme"}, "SIDECAR_METADATA: metadata name 'Tenant Name': letters, digits, "
         "'-' and '_' only (an HTTP header name) (got 'Tenant Name=acme')"),
        ({"SIDECAR_METADATA": "note=" + "x" * 3000}, "SIDECAR_METADATA: metadata of 3039 bytes is over the store's "
         "2048-byte limit (names and values, the sidecar's md5 entry included)"),
        ({"SIDECAR_CONTENT_DISPOSITION": "download"}, "SIDECAR_CONTENT_DISPOSITION: must be auto, none, or a "
         "Content-Disposition starting with inline or attachment (got 'download')"),
        ({"SIDECAR_CACHE_CONTROL": "max-age=60\u00e9"}, "SIDECAR_CACHE_CONTROL: must be printable ASCII without "
         "leading or trailing spaces (it is sent as a header) (got 'max-age=60\u00e9')"),
        ({"SIDECAR_ROUTES": "[{\"match\": \"*.mp4\""}, "SIDECAR_ROUTES: is not valid JSON (e.g. [{\"match\": "
         "\"video/*\", \"cache_control\": \"public, max-age=31536000\"}])"),
        ({"SIDECAR_ROUTES": "[{\"match\": \"*.mp4\", \"key_template\": \"{pod_id}//{relpath}\"}]"},
         "SIDECAR_ROUTES: gives keys with an empty, '.' or '..' segment (like 'a//b' or 'a/../b')"),
        ({"SIDECAR_POD_ID": "pod/1"}, "SIDECAR_POD_ID: must be one key segment: not empty, no '/', not '.' or '..', "
         "printable ASCII (got 'pod/1')"),
        ({"SIDECAR_KEY_TEMPLATE": "/{relpath}"}, "SIDECAR_KEY_TEMPLATE: gives keys starting with '/' (S3 keys have "
         "no leading slash): remove it (got '/{relpath}')"),
    ],
    ids=["no-host", "no-host-https", "space", "ipv6", "port", "userinfo", "scheme", "account", "region",
         "bucket-only", "floor-word", "floor-percent", "keep-zero", "keep-word", "after-negative", "rate-zero",
         "storage-r2", "storage-s3", "meta-name", "meta-size", "disposition", "cache-ascii", "routes-json",
         "route-template", "pod-id", "leading-slash"],
)
def test_bad_values_are_one_exact_line_and_exit_2_before_anything_starts(
        tmp_path: Path, changes: dict[str, str], line: str) -> None:
    """`check --offline` (the entrypoint's gate) and `run` refuse each bad value with exactly one line and
    exit 2, never a traceback; a password in the URL is never repeated; nothing is created."""
    env = {"PATH": os.environ["PATH"], **GOOD, **changes}
    env["SIDECAR_STATE_DIR"] = str(tmp_path / "state")
    env["SIDECAR_WATCH_DIR"] = str(tmp_path / "out")
    for command in (["check", "--offline"], ["run"]):
        done = subprocess.run([sys.executable, "-m", "sidecar", *command], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert (done.returncode, done.stderr, done.stdout) == (2, f"sidecar: {line}\n", ""), command
    assert "hunter2" not in line and not (tmp_path / "state").exists()


def test_unknown_variable_gets_one_warning_naming_the_closest(tmp_path: Path) -> None:
    """A typo'd variable is not silently ignored: one warning line naming the setting it probably meant."""
    env = {"PATH": os.environ["PATH"], **GOOD, "SIDECAR_MULTIPART_THRESHOLD": "5"}
    done = subprocess.run([sys.executable, "-m", "sidecar", "check", "--offline"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0
    assert done.stderr == ("sidecar: warning: SIDECAR_MULTIPART_THRESHOLD is not a setting and is ignored "
                           "(did you mean SIDECAR_MULTIPART_THRESHOLD_MB?)\n")


@pytest.mark.parametrize(
    ("make", "variable", "problem"),
    [
        ("file", "SIDECAR_WATCH_DIR", "is not a folder"),
        ("under-file", "SIDECAR_STATE_DIR", "cannot be created ("),
        ("symlink", "SIDECAR_STATE_DIR", "is a symbolic link; point the variable at the real folder"),
    ],
)
def test_unusable_folders_are_one_line_and_exit_2_before_anything_is_created(
        tmp_path: Path, make: str, variable: str, problem: str) -> None:
    """A watch folder that is a file, a state folder under a file or behind a symlink: `check --offline`
    and `run` say so in one line naming the variable, exit 2, and create nothing."""
    target = tmp_path / "target"
    env = {"PATH": os.environ["PATH"], **GOOD, "SIDECAR_WATCH_DIR": str(tmp_path / "out"),
           "SIDECAR_STATE_DIR": str(tmp_path / "state")}
    if make == "file":
        (tmp_path / "out").write_bytes(b"not a folder")
    elif make == "under-file":
        (tmp_path / "blocker").write_bytes(b"")
        env["SIDECAR_STATE_DIR"] = str(tmp_path / "blocker" / "state")
    else:
        target.mkdir()
        (tmp_path / "state").symlink_to(target)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for command in (["check", "--offline"], ["run"]):
        done = subprocess.run([sys.executable, "-m", "sidecar", *command], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 2, (command, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"sidecar: {variable}: ") and problem in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"SIDECAR_HTTP_HOST": "0.0.0.0"},
         "SIDECAR_HTTP_HOST: 0.0.0.0 without SIDECAR_HTTP_TOKEN would show /status (bucket, keys, file names) and "
         "/metrics to anyone who reaches the port; set a token, or SIDECAR_HTTP_PUBLIC_WITHOUT_TOKEN=true to "
         "accept that"),
        ({"SIDECAR_HTTP_TOKEN": "short"},
         "SIDECAR_HTTP_TOKEN: must be one word of at least 16 characters (e.g. from `openssl rand -hex 16`)"),
    ],
    ids=["public-without-token", "short-token"],
)
def test_the_http_endpoint_is_not_public_by_accident(tmp_path: Path, changes: dict[str, str], line: str) -> None:
    """The default binds loopback; another address needs a token of 16+ characters or the explicit opt-out.
    Each refusal is one line, exit 2, and never shows the token."""
    env = {"PATH": os.environ["PATH"], **GOOD, "SIDECAR_WATCH_DIR": str(tmp_path / "out"),
           "SIDECAR_STATE_DIR": str(tmp_path / "state"), **changes}
    done = subprocess.run([sys.executable, "-m", "sidecar", "check", "--offline"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (2, f"sidecar: {line}\n")
    assert load_settings().http_host == "127.0.0.1"
    env["SIDECAR_HTTP_PUBLIC_WITHOUT_TOKEN"] = "true"
    env.pop("SIDECAR_HTTP_TOKEN", None)
    allowed = subprocess.run([sys.executable, "-m", "sidecar", "check", "--offline"], env=env, capture_output=True,
                             text=True, timeout=60, check=False)
    assert allowed.returncode == 0, allowed.stderr
