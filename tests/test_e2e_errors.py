"""End to end, when things are wrong: a missing bucket, refused credentials, bad configuration, and what
``sidecar check`` / ``sidecar config`` / ``sidecar retry-failed`` say about it. Real processes throughout."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.daemon import DaemonProcess, sidecar_env
from support.e2e import World, states, write_at_once
from support.proxy import R2Proxy
from support.s3server import S3Server, free_port
from support.waiting import wait_until

SECRET = "MARKER-s3cr3t-7f3a9c"  # must never appear in any output


@pytest.fixture
def missing_bucket(s3_server: S3Server) -> Iterator[str]:
    """The name of a bucket that does not exist (yet); deleted afterwards if the test created it."""
    name = f"t-missing-{uuid.uuid4().hex[:12]}"
    yield name
    s3_server.delete_bucket(name)


@pytest.fixture
def make_world(tmp_path: Path, s3_server: S3Server, r2_proxy: R2Proxy) -> Iterator[Callable[[str], World]]:
    """Builds the test's world for a given bucket name (existing or not); its processes are stopped after."""
    worlds: list[World] = []

    def make(bucket: str) -> World:
        worlds.append(World(tmp_path, s3_server, r2_proxy, bucket, secret_access_key=SECRET))
        return worlds[-1]

    yield make
    for w in worlds:
        w.close()


def parked(w: World, rels: list[str], error_class: str) -> bool:
    rows = w.journal()
    return all(rel in rows and rows[rel].state == "failed" and rows[rel].error_class == error_class for rel in rels)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {lines!r}"
    return lines[0]


def write_files(w: World, count: int) -> list[str]:
    rels = [w.remember(f"img_{i:03d}.png", os.urandom(2_000)) for i in range(count)]
    for rel in rels:
        write_at_once(w.path(rel), w.written[rel])
    return rels


def paused(w: World, rels: list[str]) -> bool:
    """Every file pending, none counted an attempt, and the store judged unusable."""
    rows = w.journal()
    return all(rel in rows and rows[rel].state == "pending" and rows[rel].attempts == 0 for rel in rels)


def test_missing_bucket_pauses_uploads_parks_nothing_and_resumes_when_it_exists(
    make_world: Callable[[str], World], s3_server: S3Server, r2_proxy: R2Proxy, missing_bucket: str
) -> None:
    """NoSuchBucket is the configuration's fault, not the files': one store_unusable line naming
    SIDECAR_BUCKET, /readyz 503, /status says why, files pending with no attempt counted and no more PUTs;
    check says why; once the bucket exists, the probe sees it and the files upload, no retry-failed needed."""
    w = make_world(missing_bucket)
    daemon = w.start()
    rels = write_files(w, 3)
    wait_until(lambda: daemon.events("store_unusable") and paused(w, rels), timeout=20, message=daemon.output)
    (event,) = daemon.events("store_unusable")
    assert event["level"] == "error" and "NoSuchBucket" in event["problem"] and "SIDECAR_BUCKET" in event["hint"]
    assert daemon.events("upload_failed") == []
    status = w.status(daemon)["store"]
    assert (status["state"], "SIDECAR_BUCKET" in status["hint"]) == ("broken", True)
    assert w.ready(daemon) == 503
    assert len(r2_proxy.puts()) <= 3  # at most the first claims; nothing is claimed while the store is broken

    code, out, err = w.cli("check")
    assert (code, out) == (1, ""), err
    line = one_line(err)
    assert "HeadBucket" in line and "SIDECAR_BUCKET" in line, line  # what failed, and what to fix

    s3_server.make_bucket(missing_bucket)  # the operator fixes it
    code, out, err = w.cli("check")
    assert (code, err) == (0, ""), out + err
    assert one_line(out).startswith("ok:")
    w.wait_in_bucket(rels, daemon, timeout=40)
    w.wait_idle(daemon)
    assert w.bucket_diff(w.expected()) == []
    assert states(w.journal()) == {"uploaded": 3}
    assert [e["was"] for e in daemon.events("store_recovered")] == ["broken"]
    assert SECRET not in w.all_output()


def test_refused_credentials_pause_uploads_until_the_store_accepts_them(
    make_world: Callable[[str], World], r2_proxy: R2Proxy, bucket: str
) -> None:
    """AccessDenied on every request (HeadBucket too): paused, not parked, with the credentials hint; check
    says so; once the token is fixed the probe sees it and the files upload."""
    r2_proxy.fail_all(403, "AccessDenied", "Access Denied")
    w = make_world(bucket)
    daemon = w.start()
    rels = write_files(w, 3)
    wait_until(lambda: daemon.events("store_unusable") and paused(w, rels), timeout=20, message=daemon.output)
    rows = w.journal()
    tried = [rows[rel] for rel in rels if rows[rel].last_error]
    assert tried and all("Access Denied" in (row.last_error or "") for row in tried)
    assert "SIDECAR_ACCESS_KEY_ID" in daemon.events("store_unusable")[0]["hint"]
    assert daemon.events("upload_failed") == []

    code, out, err = w.cli("check")
    assert (code, out) == (1, ""), err
    line = one_line(err)
    assert "HeadBucket" in line and "SIDECAR_ACCESS_KEY_ID" in line, line

    r2_proxy.heal()  # new credentials, or the token got its permission
    w.wait_in_bucket(rels, daemon, timeout=40)
    w.wait_idle(daemon)
    assert w.bucket_diff(w.expected()) == []
    assert states(w.journal()) == {"uploaded": 3}
    assert SECRET not in w.all_output()


def test_check_succeeds_with_one_ok_line(make_world: Callable[[str], World], r2_proxy: R2Proxy, bucket: str) -> None:
    """``sidecar check`` against a reachable bucket exits 0 with one ``ok:`` line, after one HEAD of the bucket."""
    w = make_world(bucket)
    code, out, err = w.cli("check")
    assert (code, err) == (0, "")
    assert one_line(out).startswith("ok:") and bucket in out
    assert [r.operation for r in r2_proxy.requests] == ["HeadBucket"]
    assert SECRET not in out


def test_check_unreachable_endpoint_exits_1_with_one_line(tmp_path: Path) -> None:
    """``sidecar check`` against a closed port exits 1 with one line saying the connection failed."""
    env = sidecar_env(tmp_path, f"http://127.0.0.1:{free_port()}", "some-bucket", secret_access_key=SECRET)
    proc = DaemonProcess(env, ["check"], log_dir=tmp_path / "log").start()
    assert proc.wait(30) == 1
    line = one_line(proc.raw_stderr())
    assert "connection failed" in line, line
    assert proc.raw_stdout() == ""
    assert SECRET not in line


BAD_VALUES = [
    ("SIDECAR_WORKERS", "0"),
    ("SIDECAR_KEY_TEMPLATE", "{nope}"),
    ("SIDECAR_ENDPOINT_URL", "ftp://x"),
    ("SIDECAR_HTTP_PORT", "99999"),
    ("SIDECAR_SETTLE_S", "soon"),
]


@pytest.mark.parametrize("command", ["run", "check", "config"])
@pytest.mark.parametrize(("variable", "value"), BAD_VALUES, ids=[name for name, _ in BAD_VALUES])
def test_bad_config_exits_2_with_one_line_naming_the_variable(
    tmp_path: Path, command: str, variable: str, value: str
) -> None:
    """Any invalid SIDECAR_* value: exit 2, one stderr line naming the variable, no traceback, no secret."""
    env = sidecar_env(tmp_path, "http://127.0.0.1:9", "some-bucket", secret_access_key=SECRET)
    env[variable] = value
    proc = DaemonProcess(env, [command], log_dir=tmp_path / "log").start()
    assert proc.wait(30) == 2, proc.output()
    line = one_line(proc.raw_stderr())
    assert variable in line, line
    assert proc.raw_stdout() == ""
    assert "Traceback" not in line and SECRET not in line


@pytest.mark.parametrize("command", ["run", "check"])
def test_missing_bucket_setting_exits_2(tmp_path: Path, command: str) -> None:
    """``run`` and ``check`` without SIDECAR_BUCKET: exit 2 with one line naming it."""
    env = sidecar_env(tmp_path, "http://127.0.0.1:9", "", secret_access_key=SECRET)
    proc = DaemonProcess(env, [command], log_dir=tmp_path / "log").start()
    assert proc.wait(30) == 2, proc.output()
    assert "SIDECAR_BUCKET" in one_line(proc.raw_stderr())
    assert proc.raw_stdout() == ""


def test_unusable_watch_dir_exits_2_naming_the_variable(tmp_path: Path) -> None:
    """A SIDECAR_WATCH_DIR that cannot be created: exit 2 with one line naming it, no traceback."""
    (tmp_path / "a-file").write_bytes(b"")
    env = sidecar_env(tmp_path, "http://127.0.0.1:9", "some-bucket", secret_access_key=SECRET,
                      watch_dir=tmp_path / "a-file" / "outputs")
    proc = DaemonProcess(env, ["run"], log_dir=tmp_path / "log").start()
    assert proc.wait(30) == 2, proc.output()
    assert "SIDECAR_WATCH_DIR" in one_line(proc.raw_stderr())
    assert "Traceback" not in proc.output()


def test_config_prints_effective_config_with_secrets_redacted(tmp_path: Path) -> None:
    """``sidecar config`` prints the effective settings as JSON; every secret is ``**********``."""
    env = sidecar_env(tmp_path, "http://127.0.0.1:9", "some-bucket", secret_access_key=SECRET,
                      access_key_id=SECRET + "-id", http_token=SECRET + "-token", workers=3)
    proc = DaemonProcess(env, ["config"], log_dir=tmp_path / "log").start()
    assert proc.wait(30) == 0, proc.output()
    data = json.loads(proc.raw_stdout())
    assert data["workers"] == 3 and data["bucket"] == "some-bucket"
    assert data["secret_access_key"] == data["access_key_id"] == data["http_token"] == "**********"
    assert SECRET not in proc.output()
