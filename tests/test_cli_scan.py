"""One-shot commands as real processes: `sidecar scan`, `retry-failed`, `config`, `--version`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.daemon import sidecar_env
from support.proxy import R2Proxy
from support.s3server import S3Server

from sidecar import __version__


def sidecar(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "SIDECAR_LOG_FORMAT": "json", **env}
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env=full, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_scan_uploads_everything_and_is_idempotent(tmp_path: Path, r2_proxy: R2Proxy, s3_server: S3Server,
                                                   bucket: str) -> None:
    """`sidecar scan` uploads every file once and exits 0; a second scan sends no request."""
    env = sidecar_env(tmp_path, r2_proxy.endpoint, bucket, ca_bundle=r2_proxy.ca_bundle, settle_s=0.05,
                      pod_id="pod")
    out = tmp_path / "out"
    files = {f"d{n % 3}/ComfyUI_{n:05d}_.png": os.urandom(1000 + n) for n in range(12)}
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    first = sidecar(env, "scan")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary == {"uploaded": 12, "pending": 0, "failed": 0, "settling": 0}
    assert s3_server.objects(bucket) == {f"pod/{rel}": data for rel, data in files.items()}
    assert len(r2_proxy.puts()) == 12
    r2_proxy.clear()
    second = sidecar(env, "scan")
    assert second.returncode == 0 and r2_proxy.requests == []


def test_scan_exits_1_on_failures_and_retry_failed_requeues(tmp_path: Path, r2_proxy: R2Proxy, s3_server: S3Server,
                                                            bucket: str) -> None:
    """Files the store refuses are parked (scan exits 1); retry-failed plus a new scan uploads them."""
    env = sidecar_env(tmp_path, r2_proxy.endpoint, bucket, ca_bundle=r2_proxy.ca_bundle, settle_s=0.05,
                      pod_id="pod")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"a" * 100)
    r2_proxy.fail_all(status=403, code="AccessDenied", when=lambda r: r.operation == "PutObject")
    failed = sidecar(env, "scan")
    assert failed.returncode == 1
    assert json.loads(failed.stdout.strip().splitlines()[-1])["failed"] == 1
    events = [json.loads(line) for line in failed.stdout.splitlines() if line.startswith("{\"")]
    (failure,) = [e for e in events if e.get("event") == "upload_failed"]
    assert failure["error_class"] == "AccessDenied" and "SIDECAR_ACCESS_KEY_ID" in failure["hint"]
    r2_proxy.heal()
    assert sidecar(env, "scan").returncode == 1  # still parked: a rescan does not silently retry
    requeued = sidecar(env, "retry-failed")
    assert requeued.returncode == 0 and "requeued 1" in requeued.stdout
    assert sidecar(env, "scan").returncode == 0
    assert s3_server.objects(bucket) == {"pod/a.png": b"a" * 100}


def test_scan_against_an_unusable_bucket_parks_nothing_and_says_why(
        tmp_path: Path, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str) -> None:
    """Credentials refused everywhere (HeadBucket too): scan exits 1 with the file still pending (not
    parked) and one line on stderr naming the problem; fixed, a plain scan uploads it."""
    env = sidecar_env(tmp_path, r2_proxy.endpoint, bucket, ca_bundle=r2_proxy.ca_bundle, settle_s=0.05,
                      pod_id="pod")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"a" * 100)
    r2_proxy.fail_all(status=403, code="AccessDenied")
    refused = sidecar(env, "scan")
    assert refused.returncode == 1, refused.stderr
    summary = json.loads(refused.stdout.strip().splitlines()[-1])
    assert summary == {"uploaded": 0, "pending": 1, "failed": 0, "settling": 0}
    assert "AccessDenied" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    r2_proxy.heal()
    assert sidecar(env, "scan").returncode == 0
    assert s3_server.objects(bucket) == {"pod/a.png": b"a" * 100}


def test_config_redacts_and_version_prints(tmp_path: Path) -> None:
    """`sidecar config` prints JSON with secrets as stars; `--version` prints the version."""
    env = sidecar_env(tmp_path, "http://127.0.0.1:1", "b-ucket", secret_access_key="MARKER-8c1d")
    shown = sidecar(env, "config")
    assert shown.returncode == 0 and "MARKER-8c1d" not in shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["secret_access_key"] == "**********"
    version = sidecar(env, "--version")
    assert version.stdout.strip() == f"sidecar {__version__}"


def test_scan_after_an_outage_uploads_everything_now_and_exits_0(tmp_path: Path, r2_proxy: R2Proxy,
                                                               s3_server: S3Server, bucket: str) -> None:
    """Files waiting out a long retry delay (a throttled store) are uploaded at once by the next scan: it
    means "upload everything now", and exits 0 with nothing pending."""
    env = sidecar_env(tmp_path, r2_proxy.endpoint, bucket, ca_bundle=r2_proxy.ca_bundle, settle_s=0.05,
                      pod_id="pod", retry_base_s=600, retry_cap_s=600)
    (tmp_path / "out").mkdir()
    for n in range(3):
        (tmp_path / "out" / f"{n}.png").write_bytes(b"p" * (100 + n))
    r2_proxy.fail_all(status=429, code="TooManyRequests", when=lambda r: r.operation == "PutObject")
    throttled = sidecar(env, "scan", "--timeout", "3")
    assert throttled.returncode == 1
    assert json.loads(throttled.stdout.strip().splitlines()[-1])["pending"] == 3  # each due in ~10 minutes
    r2_proxy.heal()
    again = sidecar(env, "scan")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"uploaded": 3, "pending": 0, "failed": 0,
                                                                 "settling": 0}
    assert s3_server.objects(bucket) == {f"pod/{n}.png": b"p" * (100 + n) for n in range(3)}


def test_scan_gives_up_on_a_file_still_being_written_and_says_so(tmp_path: Path, r2_proxy: R2Proxy,
                                                                 bucket: str) -> None:
    """A writer holds a file open past --timeout: scan exits 1 within it, saying one file is still settling."""
    env = sidecar_env(tmp_path, r2_proxy.endpoint, bucket, ca_bundle=r2_proxy.ca_bundle, settle_s=0.05,
                      pod_id="pod")
    (tmp_path / "out").mkdir()
    with (tmp_path / "out" / "video.mp4").open("wb") as held:
        held.write(b"half a video")
        held.flush()
        done = sidecar(env, "scan", "--timeout", "2")
    assert done.returncode == 1
    assert json.loads(done.stdout.strip().splitlines()[-1])["settling"] == 1
    assert "--timeout" in done.stderr and "1 file(s) still being written" in done.stderr
