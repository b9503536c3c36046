"""A real Prometheus server (Debian's ``prometheus`` package) scrapes a real ``sidecar run`` every second.

One daemon, one Prometheus and one workload per module: Prometheus is started before the workload so its
counters have a sample at 0 and one after, as in production. Skips only when the binaries are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML arrives with moto[server], a test dependency
from support.daemon import DaemonProcess, sidecar_env
from support.localhttp import http_get
from support.proxy import R2Proxy
from support.s3server import S3Server, free_port
from support.tls import TlsFiles
from support.waiting import wait_until

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus-alerts.yml"
JOB = "comfyui-r2-sidecar"
FILES = {"a.png": 100, "b.png": 2000, "sub/c.webp": 30_000, "sub/d.png": 4}


def _get(url: str) -> tuple[int, bytes]:
    return http_get(url)


@dataclass
class Scraped:
    """The daemon, the Prometheus scraping it, and the workload already uploaded."""

    daemon: DaemonProcess
    daemon_port: int
    prometheus_url: str
    prometheus_log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant-query result vector (empty list when nothing matches)."""
        status, body = _get(f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None


def _start_prometheus(tmp: Path, target_port: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server binary is not installed (apt-get install -y prometheus)")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    return proc, f"http://127.0.0.1:{port}", log_path


@pytest.fixture(scope="module")
def scraped(
    s3_server: S3Server, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scraped]:
    """A daemon with Prometheus scraping it since before it uploaded FILES."""
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    bucket = s3_server.make_bucket(f"t-{uuid.uuid4().hex[:16]}")
    with R2Proxy(s3_server.endpoint, tls=tls_files) as proxy:
        env = sidecar_env(tmp, proxy.endpoint, bucket, ca_bundle=proxy.ca_bundle)
        with DaemonProcess(env, log_dir=tmp / "daemon") as daemon:
            (started,) = wait_until(lambda: daemon.events("http_started"), timeout=20, message=daemon.output)
            prometheus, url, log_path = _start_prometheus(tmp, int(started["port"]))
            try:
                scraped = Scraped(daemon, int(started["port"]), url, log_path)
                wait_until(lambda: _get(f"{url}/-/ready")[0] == 200 or prometheus.poll() is not None,
                           timeout=30, message=log_path.read_text)
                assert prometheus.poll() is None, log_path.read_text()
                # The first scrape sees the counters at 0; only then does the workload begin.
                wait_until(lambda: scraped.value(f'sidecar_uploads_total{{job="{JOB}",outcome="uploaded"}}') == 0,
                           timeout=15, message=log_path.read_text)
                for rel, size in FILES.items():
                    path = Path(env["SIDECAR_WATCH_DIR"]) / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"x" * size)
                yield scraped
            finally:
                prometheus.terminate()
                try:
                    prometheus.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    prometheus.kill()
                    prometheus.wait(timeout=10)
    s3_server.delete_bucket(bucket)


def test_prometheus_query_returns_the_uploaded_file_count(scraped: Scraped) -> None:
    """Prometheus scrapes the daemon and its query API returns sidecar_uploads_total{outcome="uploaded"} == N."""
    n = len(FILES)
    wait_until(lambda: scraped.value('sidecar_uploads_total{outcome="uploaded"}') == n, timeout=15,
               message=scraped.daemon.output)
    assert scraped.value("sum(sidecar_uploaded_bytes_total)") == sum(FILES.values())
    assert scraped.value(f'up{{job="{JOB}"}}') == 1
    status, body = _get(f"{scraped.prometheus_url}/api/v1/targets")
    assert status == 200, body
    (target,) = json.loads(body)["data"]["activeTargets"]
    assert (target["health"], target["lastError"]) == ("up", "")
    status, body = _get(f"{scraped.prometheus_url}/api/v1/rules")
    assert status == 200, body
    rules = [rule for group in json.loads(body)["data"]["groups"] for rule in group["rules"]]
    assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules), rules


def test_promtool_finds_no_problems_in_the_live_exposition(scraped: Scraped) -> None:
    """promtool check metrics accepts what the running daemon actually serves on /metrics."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    status, body = _get(f"http://127.0.0.1:{scraped.daemon_port}/metrics")
    assert status == 200
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30,
                            check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result


def _alerts() -> list[Any]:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    return [pytest.param(rule["alert"], rule["expr"], id=rule["alert"]) for rule in rules]


@pytest.mark.parametrize(("alert", "expr"), _alerts())
def test_alert_expression_is_quiet_on_a_healthy_daemon(scraped: Scraped, alert: str, expr: str) -> None:
    """With the daemon's real series after a successful workload, the alert's expression selects nothing."""
    wait_until(lambda: scraped.value('sidecar_uploads_total{outcome="uploaded"}') == len(FILES), timeout=15)
    assert scraped.query(expr) == [], alert
