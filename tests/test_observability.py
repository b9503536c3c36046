"""What operators see, end to end: a real ``sidecar run`` subprocess, a real moto S3 server behind the
strict R2 proxy (https), real inotify. Metrics are parsed with prometheus_client's own parser."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.daemon import DaemonProcess, sidecar_env
from support.localhttp import http_get
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.waiting import wait_until

from sidecar.health import Canary
from sidecar.metrics import DiskCollector, JournalCollector, Metrics
from sidecar.metrics_jobs import JobCollector, JobMetrics
from sidecar.watcher import Watcher

README = Path(__file__).resolve().parent.parent / "README.md"
TOKEN = "obs-t0ken-4b9e-0123456789"
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+Z$")
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a KeyError names the missing series."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise KeyError(f"no sample {name}{labels}")
    return samples[key]


def total(samples: Samples, name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(value for (n, _), value in samples.items() if n == name)


@dataclass
class Sidecar:
    """A running daemon and what the tests need to talk to it."""

    proc: DaemonProcess
    port: int
    root: Path
    env: dict[str, str]

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        return http_get(f"http://127.0.0.1:{self.port}{path}", token)

    def json(self, path: str, token: str | None = None) -> tuple[int, Any]:
        status, body = self.get(path, token)
        return status, json.loads(body)

    def answers(self, path: str, status: int) -> Callable[[], Any]:
        """A wait_until predicate: the JSON body once ``path`` answers ``status``, else None."""

        def check() -> Any:
            got, body = self.json(path)
            return body if got == status else None

        return check

    def metrics(self, token: str | None = None) -> Samples:
        status, body = self.get("/metrics", token)
        assert status == 200, body
        return parse_metrics(body.decode())

    def cli(self, *args: str, **extra: str) -> tuple[int, str, str]:
        """Run ``sidecar <args>`` with this daemon's environment (plus ``extra``); (code, stdout, stderr)."""
        env = {**self.env, "SIDECAR_HTTP_PORT": str(self.port), **extra}
        proc = DaemonProcess(env, args, log_dir=self.proc.log_dir / f"cli-{time.monotonic_ns()}").start()
        code = proc.wait(timeout=30)
        return code, proc.raw_stdout(), proc.raw_stderr()

    def write(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


StartSidecar = Callable[..., Sidecar]


@pytest.fixture
def start_sidecar(
    tmp_path: Path, r2_proxy: R2Proxy, bucket: str
) -> Iterator[StartSidecar]:
    """Start ``sidecar run`` against ``bucket`` through the https proxy; every daemon is stopped afterwards."""
    running: list[DaemonProcess] = []

    def _start(**extra: str | int | float) -> Sidecar:
        env = sidecar_env(tmp_path, r2_proxy.endpoint, bucket, ca_bundle=r2_proxy.ca_bundle, **extra)
        proc = DaemonProcess(env, log_dir=tmp_path / f"daemon-{len(running)}").start()
        running.append(proc)
        wait_until(lambda: proc.events("http_started") or not proc.is_running(), timeout=20, message=proc.output)
        assert proc.is_running(), proc.output()
        wait_until(lambda: proc.events("scan_completed"), timeout=10, message=proc.output)
        port = int(proc.events("http_started")[0]["port"])
        return Sidecar(proc, port, Path(env["SIDECAR_WATCH_DIR"]), env)

    yield _start
    for proc in running:
        proc.stop()


def _uploaded(sidecar: Sidecar, n: int) -> Callable[[], bool]:
    return lambda: sample(sidecar.metrics(TOKEN), "sidecar_queue_files", state="uploaded") == n


# -- /metrics -------------------------------------------------------------------------------------------


def test_metrics_count_a_known_workload_exactly(
    start_sidecar: StartSidecar, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """After N files, every counter moved by exactly the workload and the queue gauges read the journal."""
    sidecar = start_sidecar()
    before = sidecar.metrics()
    started = time.time()
    files = {"a.png": 1000, "b.webp": 2345, "sub/c.png": 10_000, "sub/deeper/d.mp4": 65_537, "e.png": 1}
    for rel, size in files.items():
        sidecar.write(rel, os.urandom(size))
    n, nbytes = len(files), sum(files.values())
    wait_until(lambda: sample(sidecar.metrics(), "sidecar_queue_files", state="uploaded") == n,
               message=sidecar.proc.output)
    after = sidecar.metrics()

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("sidecar_uploads_total", outcome="uploaded") == n
    for outcome in ("existing", "unchanged", "retry", "failed", "skipped", "paused"):
        assert delta("sidecar_uploads_total", outcome=outcome) == 0, outcome
    assert delta("sidecar_uploaded_bytes_total") == nbytes
    assert sample(after, "sidecar_s3_requests_total", operation="PutObject", status="200") == n
    assert total(after, "sidecar_s3_requests_total") - total(before, "sidecar_s3_requests_total") == n
    assert total(after, "sidecar_files_discovered_total") - total(before, "sidecar_files_discovered_total") == n
    assert total(after, "sidecar_upload_retries_total") == 0
    assert delta("sidecar_end_to_end_latency_seconds_count") == n
    assert delta("sidecar_end_to_end_latency_seconds_sum") > 0
    assert delta("sidecar_upload_duration_seconds_count") == n
    assert sample(after, "sidecar_last_upload_success_timestamp_seconds") > started
    assert sample(after, "sidecar_queue_bytes", state="uploaded") == nbytes
    for state in ("pending", "uploading", "failed", "skipped"):
        assert sample(after, "sidecar_queue_files", state=state) == 0, state
    assert sample(after, "sidecar_oldest_pending_age_seconds") == 0
    assert sample(after, "sidecar_upload_in_progress_bytes") == 0
    assert sample(after, "sidecar_watcher_up") == 1
    assert sample(after, "sidecar_watcher_mode", mode="inotify") == 1
    assert sample(after, "sidecar_store_reachable") == 1
    assert sample(after, "sidecar_build_info", version="0.1.0") == 1
    # One request per file, all of them PUTs, and every object holds the file's bytes.
    assert [r.operation for r in r2_proxy.requests] == ["PutObject"] * n
    objects = s3_server.objects(bucket)
    assert sorted(hashlib.md5(b).hexdigest() for b in objects.values()) == sorted(
        hashlib.md5((sidecar.root / rel).read_bytes()).hexdigest() for rel in files
    )


def test_readme_metrics_table_lists_every_exported_metric() -> None:
    """The README's Metrics table names exactly the metric families the daemon's registry exports."""
    registry = CollectorRegistry()
    Metrics(registry)
    registry.register(JournalCollector(lambda: {"pending": (1, 1)}, lambda: 0.0))
    registry.register(DiskCollector(lambda: (1, 2)))
    JobMetrics(registry)  # registered when jobs are on (the default)
    registry.register(JobCollector(lambda: {"running": 0}, lambda: (0, 0.0, None), lambda: False))
    exposition = generate_latest(registry).decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", exposition, flags=re.MULTILINE))
    exported = {name for name in exported if not name.endswith("_created")}  # `sidecar run` disables these
    standard = {name for name in exported if name.startswith(("process_", "python_"))}
    assert {"process_resident_memory_bytes", "process_open_fds", "python_info"} <= standard
    assert len(exported - standard) > 20
    assert _readme_metrics() == exported - standard
    assert "`process_*`" in README.read_text(), "the README names the standard families it does not table"


def _readme_metrics() -> set[str]:
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(sidecar_[a-z0-9_]+)` \|", section, flags=re.MULTILINE))


# -- /healthz ------------------------------------------------------------------------------------------


def test_canary_armed_after_a_watcher_restart_is_proven(tmp_path: Path) -> None:
    """A replaced root is deaf at once, the deaf verdict writes no canary, and arming after the restart proves it."""
    root = tmp_path / "out"
    canary = Canary(root)
    watcher = Watcher(root, on_path=lambda rel, _source: canary.seen() if canary.matches(rel) else None,
                      on_dir=lambda _rel: None, on_overflow=lambda: None)
    watcher.start()
    canary.arm()
    try:
        wait_until(lambda: canary.check(watcher.is_alive(), grace_s=3.0) == "ok")
        shutil.rmtree(root)
        root.mkdir()
        assert not canary.root_intact()
        written = canary.written_at
        assert (canary.check(watcher.is_alive(), grace_s=3.0), canary.reason) == ("deaf", "root_replaced")
        assert canary.written_at == written, "a canary written before the new watch exists never comes back"
        watcher.restart()
        canary.arm()
        assert canary.root_intact() and not canary.healthy
        wait_until(lambda: canary.check(watcher.is_alive(), grace_s=3.0) == "ok", timeout=3)
    finally:
        watcher.stop()
        canary.close()


def test_healthz_detects_a_replaced_root_and_repairs_the_watcher(
    start_sidecar: StartSidecar, s3_server: S3Server, bucket: str
) -> None:
    """Deleting and recreating the watched folder makes the watcher deaf; it is rebuilt and events flow again."""
    sidecar = start_sidecar()
    assert sidecar.get("/healthz")[0] == 200
    shutil.rmtree(sidecar.root)
    sidecar.root.mkdir()
    # /healthz checks the root on every request: unhealthy until the maintenance loop (every 2 s) repairs it.
    degraded = wait_until(lambda: sidecar.proc.events("watcher_degraded"), timeout=10, message=sidecar.proc.output)
    assert degraded[0]["reason"] == "root_replaced"
    wait_until(lambda: sidecar.get("/healthz")[0] == 200, timeout=10, message=sidecar.proc.output)
    assert sample(sidecar.metrics(), "sidecar_watcher_restarts_total", reason="root_replaced") == 1
    assert sample(sidecar.metrics(), "sidecar_watcher_up") == 1

    sidecar.write("after.png", b"written after the repair")
    wait_until(lambda: sidecar.proc.events("upload_succeeded"), message=sidecar.proc.output)
    (uploaded,) = [e for e in sidecar.proc.events("upload_succeeded") if e["path"] == "after.png"]
    assert uploaded["source"] in ("close", "create"), "found by a scan, not by the rebuilt watcher"
    assert [k.rsplit("/", 1)[-1] for k in s3_server.keys(bucket)] == ["after.png"]
    assert len(sidecar.proc.events("watcher_degraded")) == 1, "the repaired watcher was restarted again"


def test_healthz_is_503_while_the_root_cannot_be_watched(
    start_sidecar: StartSidecar, s3_server: S3Server, bucket: str
) -> None:
    """A watched path replaced by a file keeps /healthz at 503 with the reason; restoring it heals the daemon."""
    sidecar = start_sidecar()
    shutil.rmtree(sidecar.root)
    sidecar.root.write_bytes(b"not a folder")
    wait_until(lambda: sidecar.proc.events("watcher_restart_failed"), timeout=10, message=sidecar.proc.output)
    body = wait_until(sidecar.answers("/healthz", 503), timeout=3, message=sidecar.proc.output)
    assert body["ok"] is False
    assert body["watcher"]["alive"] is False
    assert sidecar.json("/readyz")[0] == 503
    assert sample(sidecar.metrics(), "sidecar_watcher_up") == 0
    # Still deaf a check later, and the repeated failure is logged once, not every 2 s.
    wait_until(lambda: total(sidecar.metrics(), "sidecar_watcher_restarts_total") >= 2, timeout=10)
    assert sidecar.get("/healthz")[0] == 503
    assert len(sidecar.proc.events("watcher_restart_failed")) == 1

    sidecar.root.unlink()
    sidecar.root.mkdir()
    wait_until(lambda: sidecar.get("/healthz")[0] == 200, timeout=10, message=sidecar.proc.output)
    (recovered,) = wait_until(lambda: sidecar.proc.events("watcher_recovered"), timeout=5)
    assert recovered["errors"] >= 2
    sidecar.write("back.png", b"after recovery")
    wait_until(lambda: sidecar.proc.events("upload_succeeded"), message=sidecar.proc.output)
    assert [k.rsplit("/", 1)[-1] for k in s3_server.keys(bucket)] == ["back.png"]


# -- /readyz -------------------------------------------------------------------------------------------


def test_readyz_follows_the_bucket_through_an_outage(
    start_sidecar: StartSidecar, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """The store going away during an upload turns /readyz 503 with the reason; the file waits paused (no
    attempt counted); /readyz is 200 again and the file lands once the store answers."""
    sidecar = start_sidecar()
    assert sidecar.get("/readyz")[0] == 200
    r2_proxy.down()
    sidecar.write("outage.png", b"uploaded once the store is back")
    body = wait_until(sidecar.answers("/readyz", 503), message=sidecar.proc.output)
    assert body["store"] is False
    assert "PutObject" in body["store_problem"] and "ConnectionError" in body["store_problem"]
    store = sidecar.json("/status")[1]["store"]
    assert (store["reachable"], store["state"]) == (False, "down")
    assert sidecar.get("/healthz")[0] == 200, "an unreachable store is not a liveness problem"
    assert sample(sidecar.metrics(), "sidecar_store_reachable") == 0
    assert sample(sidecar.metrics(), "sidecar_store_state", state="down") == 1

    r2_proxy.up()
    wait_until(lambda: sidecar.get("/readyz")[0] == 200, message=sidecar.proc.output)
    wait_until(lambda: sidecar.proc.events("upload_succeeded"), message=sidecar.proc.output)
    assert [k.rsplit("/", 1)[-1] for k in s3_server.keys(bucket)] == ["outage.png"]
    # The outage was logged once at error, and its end once, with how long it lasted.
    (unavailable,) = sidecar.proc.events("store_unavailable")
    assert unavailable["level"] == "error" and "ConnectionError" in unavailable["problem"]
    (recovered,) = wait_until(lambda: sidecar.proc.events("store_recovered"))
    assert recovered["was"] == "down" and recovered["failed_requests"] >= 1 and recovered["outage_s"] > 0
    assert sidecar.proc.events("upload_succeeded")[0]["attempt"] == 1  # the paused attempt was not counted


def test_readyz_recovers_while_idle_by_probing_only_while_down(
    start_sidecar: StartSidecar, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """A healthy idle daemon sends nothing; while the store is down a HeadBucket probe asks; its first answer
    restores /readyz and the waiting file uploads without an operator; then the probing stops."""
    sidecar = start_sidecar()
    assert sidecar.get("/readyz")[0] == 200
    assert r2_proxy.requests == [], "a healthy idle daemon sends no requests"
    r2_proxy.down()
    sidecar.write("waiting.png", b"waits during the outage")
    wait_until(sidecar.answers("/readyz", 503), message=sidecar.proc.output)

    r2_proxy.up()
    wait_until(lambda: sidecar.get("/readyz")[0] == 200, timeout=20, message=sidecar.proc.output)
    wait_until(lambda: sidecar.proc.events("upload_succeeded"), message=sidecar.proc.output)
    assert [k.rsplit("/", 1)[-1] for k in s3_server.keys(bucket)] == ["waiting.png"]
    assert [(r.operation, r.status) for r in r2_proxy.requests] == [("HeadBucket", 200), ("PutObject", 200)]
    assert sidecar.json("/status")[1]["recent_failures"] == []
    wait_until(lambda: sidecar.get("/readyz")[0] == 200)
    assert [r.operation for r in r2_proxy.requests].count("HeadBucket") == 1, "probing stopped once it answered"


# -- token auth ----------------------------------------------------------------------------------------


def test_token_guards_everything_but_healthz(start_sidecar: StartSidecar) -> None:
    """With SIDECAR_HTTP_TOKEN, /metrics /status /readyz need the bearer token; /healthz stays open."""
    sidecar = start_sidecar(http_token=TOKEN, http_host="127.0.0.1")
    assert sidecar.proc.events("http_started")[0]["host"] == "127.0.0.1"
    for path in ("/metrics", "/status", "/readyz"):
        assert sidecar.get(path)[0] == 401, path
        assert sidecar.get(path, token="wrong")[0] == 401, path
        assert sidecar.get(path, token=TOKEN)[0] == 200, path
    assert sidecar.get("/healthz")[0] == 200
    assert sample(sidecar.metrics(TOKEN), "sidecar_http_unauthorized_total") == 6  # every refusal counted

    sidecar.write("one.png", b"1")
    wait_until(_uploaded(sidecar, 1), message=sidecar.proc.output)
    code, out, err = sidecar.cli("status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "sidecar 0.1.0"
    assert "uploaded=1" in lines[1] and "pending=0" in lines[1]
    assert "one.png" in out and "inotify" in out
    code, out, err = sidecar.cli("status", SIDECAR_HTTP_TOKEN="wrong-token-0123456789")
    assert code == 1 and out == "" and "SIDECAR_HTTP_TOKEN" in err and "refused" in err


# -- logs ----------------------------------------------------------------------------------------------


def test_every_log_line_of_a_full_run_is_structured_json(start_sidecar: StartSidecar, r2_proxy: R2Proxy) -> None:
    """Start, uploads, a retry, a failure and shutdown: every stdout line is JSON with the standard fields."""
    sidecar = start_sidecar(log_level="DEBUG", retry_base_s=0.2, retry_cap_s=0.5)
    r2_proxy.fail_next(3, status=503, code="SlowDown", when=lambda r: (r.key or "").endswith("retry.png"))
    r2_proxy.fail_next(1, status=403, code="AccessDenied", when=lambda r: (r.key or "").endswith("denied.png"))
    for name in ("ok.png", "retry.png", "denied.png"):
        sidecar.write(name, name.encode())
    wait_until(lambda: len(sidecar.proc.events("upload_succeeded")) == 2 and sidecar.proc.events("upload_failed"),
               message=sidecar.proc.output)
    assert sidecar.proc.terminate(timeout=10) == 0

    raw = sidecar.proc.raw_stdout().splitlines()
    lines = [json.loads(line) for line in raw]  # every line, not just the ones that parse
    assert len(lines) > 10
    for line in lines:
        assert {"timestamp", "level", "event", "logger"} <= line.keys(), line
        assert ISO_UTC.match(line["timestamp"]), line
        if line["logger"].startswith("sidecar"):
            assert SNAKE_CASE.match(line["event"]), line
    # stdlib records (watchdog's, botocore's) are rendered the same way: tests/test_logs.py; this run has none
    assert sidecar.proc.raw_stderr() == ""
    events = [line["event"] for line in lines]
    for event in ("daemon_starting", "http_started", "daemon_started", "scan_completed", "file_queued",
                  "upload_succeeded", "upload_retry_scheduled", "upload_failed", "shutdown_started",
                  "shutdown_completed"):
        assert event in events, event

    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    for ok in by_event["upload_succeeded"]:
        assert {"path", "key", "bytes", "attempt", "duration_s"} <= ok.keys(), ok
    (retried,) = [e for e in by_event["upload_succeeded"] if e["path"] == "retry.png"]
    assert retried["attempt"] == 2
    retries = by_event["upload_retry_scheduled"]
    assert [e["layer"] for e in retries] == ["fast", "fast", "journal"]
    for retry in retries:
        assert {"error", "error_class", "attempt"} <= retry.keys(), retry
        assert retry["error_class"] == "SlowDown"
    (failed,) = by_event["upload_failed"]
    assert (failed["path"], failed["error_class"], failed["level"]) == ("denied.png", "AccessDenied", "error")
    assert "hint" in failed and failed["error"].startswith("PutObject failed")


# -- progress ------------------------------------------------------------------------------------------


def test_large_upload_reports_progress(
    start_sidecar: StartSidecar, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """A file above the multipart threshold logs upload_progress up to its size and lands byte for byte."""
    sidecar = start_sidecar(multipart_threshold_mb=5, part_size_mb=5)
    data = os.urandom(12 * 1024 * 1024 + 4321)
    sidecar.write("big.mp4", data)
    (done,) = wait_until(lambda: sidecar.proc.events("upload_succeeded"), timeout=30, message=sidecar.proc.output)
    assert done["bytes"] == len(data)
    progress = sidecar.proc.events("upload_progress")
    assert progress, sidecar.proc.output()
    assert all(p["bytes_total"] == len(data) and p["rate_bps"] > 0 for p in progress)
    assert [p["bytes_done"] for p in progress] == sorted(p["bytes_done"] for p in progress)
    assert progress[-1]["bytes_done"] == len(data)
    assert [r.operation for r in r2_proxy.requests if r.operation != "HeadObject"] == [
        "CreateMultipartUpload", "UploadPart", "UploadPart", "UploadPart", "CompleteMultipartUpload",
    ]
    (body,) = s3_server.objects(bucket).values()
    assert body == data
    assert sample(sidecar.metrics(), "sidecar_upload_in_progress_bytes") == 0
