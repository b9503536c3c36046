"""The uploader's bookkeeping: backoff, breaker, outcomes in the journal and metrics, over a real server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support.proxy import R2Proxy
from support.s3server import S3Server

from sidecar.backoff import Breaker, RetryPolicy, backoff
from sidecar.config import load_settings
from sidecar.journal import Candidate, Journal
from sidecar.keys import KeyBuilder
from sidecar.metrics import Metrics
from sidecar.store_s3 import S3Store, make_client
from sidecar.transfer import MIB, Transfer
from sidecar.uploader import Uploader

POLICY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=8.0)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_backoff_is_exponential_jittered_and_capped() -> None:
    """Delays double per attempt, stay within [half, full] of the step, and never pass the cap."""
    assert backoff(1, base=1, cap=8, rand=lambda: 1.0) == 1
    assert backoff(3, base=1, cap=8, rand=lambda: 1.0) == 4
    assert backoff(3, base=1, cap=8, rand=lambda: 0.0) == 2
    assert backoff(30, base=1, cap=8, rand=lambda: 1.0) == 8


def test_breaker_lets_one_probe_through_per_step() -> None:
    """While the store is down no work is claimed except one probe per backoff step; success closes it."""
    clock = Clock()
    breaker = Breaker(POLICY, clock)
    assert breaker.allowance(4) == 4
    breaker.record(reachable=False)
    assert breaker.allowance(4) == 0
    clock.now += 10
    assert breaker.allowance(4) == 1
    assert breaker.allowance(4) == 0
    assert breaker.record(reachable=True) is True
    assert breaker.allowance(4) == 4


@pytest.fixture
def rig(tmp_path: Path, r2_proxy: R2Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(r2_proxy.ca_bundle))
    settings = load_settings(bucket=bucket, endpoint_url=r2_proxy.endpoint, region="us-east-1",
                             access_key_id="testing", secret_access_key="testing")
    store = S3Store(make_client(settings), bucket)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    journal = Journal(tmp_path / "journal.sqlite3")
    root = tmp_path / "out"
    root.mkdir()

    def factory(retry: Any, progress: Any) -> Transfer:
        return Transfer(store, root, KeyBuilder("p/{relpath}", "p"), multipart_threshold=5 * MIB,
                        part_size=5 * MIB, retry=retry, on_multipart=journal.set_upload, on_progress=progress)

    uploader = Uploader(journal, factory, workers=2, policy=POLICY, metrics=metrics)
    return {"journal": journal, "root": root, "uploader": uploader, "registry": registry}


def queue(rig: dict[str, Any], name: str, data: bytes) -> None:
    path = rig["root"] / name
    path.write_bytes(data)
    st = path.stat()
    rig["journal"].record([Candidate(name.encode(), st.st_size, st.st_mtime_ns, "close")])


def test_transient_errors_retry_then_park(rig: dict[str, Any], r2_proxy: R2Proxy) -> None:
    """A 503 goes back to pending with an attempt counted; after max_attempts the file is parked as failed."""
    journal: Journal = rig["journal"]
    queue(rig, "a.png", b"a")
    r2_proxy.fail_all(status=503, code="ServiceUnavailable")
    (row,) = journal.claim(1)
    assert rig["uploader"].process(row) == "retry"
    assert journal.get(b"a.png").attempts == 1 and journal.get(b"a.png").state == "pending"
    for attempts in (1, 2):
        row = journal.get(b"a.png")
        rig["uploader"].process(row.__class__(**{**_fields(row), "attempts": attempts}))
    assert journal.get(b"a.png").state == "failed"
    assert "ServiceUnavailable" in (journal.get(b"a.png").last_error or "")
    registry: CollectorRegistry = rig["registry"]
    assert registry.get_sample_value("sidecar_uploads_total", {"outcome": "failed"}) == 1
    assert registry.get_sample_value("sidecar_upload_retries_total", {"error_class": "ServiceUnavailable"}) >= 1


def _fields(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__slots__}


def test_multipart_failure_leaves_no_progress_behind(rig: dict[str, Any], r2_proxy: R2Proxy, s3_server: S3Server,
                                                     bucket: str) -> None:
    """A multipart upload refused midway is aborted, parked, and takes its bytes out of the progress gauge."""
    queue(rig, "big.mp4", os.urandom(12 * MIB))
    r2_proxy.fail_all(status=403, code="AccessDenied", when=lambda r: r.part_number == 2)
    (row,) = rig["journal"].claim(1)
    assert rig["uploader"].process(row) == "failed"
    assert rig["registry"].get_sample_value("sidecar_upload_in_progress_bytes") == 0
    assert s3_server.direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert rig["journal"].orphaned_multipart() == []
