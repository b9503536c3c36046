"""Tests for deploy/: alert rules and their unit tests under promtool, the metrics lint, the dashboard.

promtool comes from Debian's ``prometheus`` package (``apt-get install -y prometheus``); without it the
promtool tests skip, the pure-Python checks still run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML arrives with moto[server], a test dependency
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.metrics import DiskCollector, JournalCollector, Metrics
from sidecar.metrics_jobs import JobCollector, JobMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\bsidecar_[a-z0-9_]+")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of the promtool binary, or skip."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    return path


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60, check=False)


def _exposition() -> str:
    """Text exposition of a fresh Metrics with every labelled metric touched once, plus queue gauges."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    registry.register(JournalCollector(lambda: {"pending": (3, 300), "failed": (1, 10)}, lambda: 42.0))
    registry.register(DiskCollector(lambda: (5 << 30, 100 << 30)))
    jobs = JobMetrics(registry)
    registry.register(JobCollector(lambda: {"running": 1, "uploading": 0, "complete": 5, "failed": 1},
                                   lambda: (2, 1200.0, 30.0), lambda: True))
    jobs.job_lag.observe(0.4)
    jobs.webhook_lag.observe(1.0)
    metrics.files_discovered.labels(source="event").inc()
    metrics.files_skipped.labels(reason="extension").inc()
    for outcome in ("uploaded", "existing", "unchanged", "retry", "failed"):
        metrics.uploads.labels(outcome=outcome).inc()
    metrics.retries.labels(error_class="SlowDown").inc()
    metrics.s3_requests.labels(operation="PutObject", status="200").inc()
    metrics.watcher_mode.labels(mode="inotify").set(1)
    metrics.rescans.labels(trigger="startup").inc()
    metrics.bytes_uploaded.inc(1024)
    metrics.upload_duration.observe(0.3)
    metrics.e2e_latency.observe(1.5)
    metrics.scan_duration.observe(0.01)
    return generate_latest(registry).decode()


def _exported_names() -> set[str]:
    lines = [line for line in _exposition().splitlines() if line and not line.startswith("#")]
    return {line.split("{")[0].split(" ")[0] for line in lines}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in _dashboard()["panels"] for target in panel.get("targets", [])]


def test_rules_pass_promtool_check(promtool: str) -> None:
    """promtool check rules accepts the alert rules."""
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    """promtool test rules runs the alert unit tests green."""
    result = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_exposition_passes_promtool_lint(promtool: str) -> None:
    """promtool check metrics finds no naming or help problem in the daemon's exposition."""
    result = _run(promtool, "check", "metrics", stdin=_exposition())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL once Grafana's variables are filled in."""
    rules = []
    for n, query in enumerate(_dashboard_exprs()):
        expr = query
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_firing_and_quiet_tests() -> None:
    """Each alert in the rules file is unit-tested both firing and not firing."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert alerts == {
        "SidecarPendingTooOld", "SidecarUploadsFailing", "SidecarWatcherDown", "SidecarStalled",
        "SidecarDown", "SidecarDiskAlmostFull", "SidecarWebhookBacklog",
    }
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == alerts
    assert quiet == alerts


def test_alerts_and_dashboard_use_exported_metrics() -> None:
    """Every sidecar_* name in the alert rules and the dashboard is a series the daemon exports."""
    exported = _exported_names()
    used = set(METRIC_NAME.findall(RULES.read_text()))
    used |= set(METRIC_NAME.findall(json.dumps(_dashboard_exprs())))
    assert used, "no metric names found"
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_dashboard_shape() -> None:
    """The dashboard is importable: unique panel ids, a grid position and queries on every panel."""
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    joined = " ".join(_dashboard_exprs())
    for needle in ("sidecar_uploads_total", "sidecar_queue_files", "sidecar_oldest_pending_age_seconds",
                   "sidecar_end_to_end_latency_seconds_bucket", "sidecar_uploaded_bytes_total",
                   "sidecar_watcher_up", "sidecar_s3_requests_total"):
        assert needle in joined, needle


def test_a_run_without_promtool_ends_with_how_to_get_it(tmp_path: Path) -> None:
    """Plain pytest on a machine without promtool skips those tests and says, in one line, how to get it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "promtool_check"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": str(bin_dir)},
        cwd=Path(__file__).resolve().parent.parent, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"^\d+ test\(s\) skipped: to run them, install Debian's prometheus package "
        r"\(apt-get install -y prometheus\) for promtool$", result.stdout, flags=re.MULTILINE,
    ), result.stdout
