"""The uploader's bookkeeping: backoff, StoreHealth, one outcome per attempt in the journal and metrics,
over a real server."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.waiting import wait_until

from sidecar.backoff import RetryPolicy, backoff
from sidecar.config import load_settings
from sidecar.errors import TransientStoreError
from sidecar.journal import Candidate, FileRow, Journal
from sidecar.keys import KeyBuilder
from sidecar.metrics import Metrics
from sidecar.routing import Router
from sidecar.store_health import StoreHealth, StoreProbe
from sidecar.store_s3 import S3Store, make_client
from sidecar.transfer import MIB, FileChanged, Result, Transfer
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


@pytest.fixture
def rig(tmp_path: Path, r2_proxy: R2Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(r2_proxy.ca_bundle))
    settings = load_settings(bucket=bucket, endpoint_url=r2_proxy.endpoint, region="us-east-1",
                             access_key_id="testing", secret_access_key="testing")
    health = StoreHealth()
    store = S3Store(make_client(settings), bucket, observer=health.observe)
    health.verify = store.check
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    journal = Journal(tmp_path / "journal.sqlite3")
    root = tmp_path / "out"
    root.mkdir()
    transfers: list[Transfer] = []

    def factory(retry: Any, progress: Any) -> Transfer:
        keys = Router.plain(KeyBuilder("p/{relpath}", "p"))
        transfers.append(Transfer(store, root, keys, multipart_threshold=5 * MIB, part_size=5 * MIB, retry=retry,
                                  ledger=journal, on_progress=progress))
        return transfers[-1]

    uploader = Uploader(journal, factory, workers=2, policy=POLICY, metrics=metrics, health=health)
    return {"journal": journal, "root": root, "uploader": uploader, "registry": registry, "health": health,
            "store": store, "transfer": transfers[0]}


def queue(rig: dict[str, Any], name: str, data: bytes) -> None:
    path = rig["root"] / name
    path.write_bytes(data)
    st = path.stat()
    rig["journal"].record([Candidate(name.encode(), st.st_size, st.st_mtime_ns, "close", st.st_ino, st.st_ctime_ns)])


def claim_one(journal: Journal) -> FileRow:
    (row,) = journal.claim(1)
    return row


def test_file_transient_errors_back_off_count_and_park(rig: dict[str, Any], r2_proxy: R2Proxy) -> None:
    """An error of this file (BadDigest) goes back to pending with an attempt counted and a delay; after
    max_attempts it is parked as failed with its class and message. The store stays 'up'."""
    journal: Journal = rig["journal"]
    queue(rig, "a.png", b"a")
    r2_proxy.fail_all(status=400, code="BadDigest")
    assert rig["uploader"].process(claim_one(journal)) == "retry"
    row = journal.get(b"a.png")
    assert (row.state, row.attempts, row.error_class) == ("pending", 1, "BadDigest") and journal.next_due_in() > 0.4
    for _ in range(2):
        journal._db.execute("UPDATE files SET next_attempt_at = 0")
        rig["uploader"].process(claim_one(journal))
    row = journal.get(b"a.png")
    assert (row.state, row.attempts, row.error_class) == ("failed", 3, "BadDigest")
    registry: CollectorRegistry = rig["registry"]
    assert registry.get_sample_value("sidecar_uploads_total", {"outcome": "failed"}) == 1
    assert registry.get_sample_value("sidecar_upload_retries_total", {"error_class": "BadDigest"}) >= 2
    assert rig["health"].state == "up"


def test_outage_pauses_without_counting_and_resumes_when_the_store_answers(
        rig: dict[str, Any], r2_proxy: R2Proxy) -> None:
    """5xx from the store: the file is paused (pending, due now, no attempt counted), the store is 'down'
    and nothing is claimed; the first answer to the probe makes it 'up' and the file claimable."""
    journal: Journal = rig["journal"]
    uploader: Uploader = rig["uploader"]
    queue(rig, "a.png", b"a")
    r2_proxy.fail_all(status=503, code="ServiceUnavailable")
    assert uploader.process(claim_one(journal)) == "paused"
    row = journal.get(b"a.png")
    assert (row.state, row.attempts, row.error_class) == ("pending", 0, "ServiceUnavailable")
    assert rig["health"].state == "down" and uploader.run_once() == 0 and journal.stats()["pending"][0] == 1
    r2_proxy.heal()
    rig["store"].check()  # what StoreProbe sends
    assert rig["health"].state == "up" and uploader.run_once() == 1


def test_probe_ends_an_outage_within_its_interval(rig: dict[str, Any], r2_proxy: R2Proxy) -> None:
    """StoreProbe asks while the store is down and stops asking once it answers."""
    import threading  # noqa: PLC0415

    health: StoreHealth = rig["health"]
    stop = threading.Event()
    probe = StoreProbe(health, rig["store"].check, stop, every_s=0.05)
    r2_proxy.down()
    health.judge(TransientStoreError("connection failed", operation="PutObject", code="ConnectionError",
                                     scope="bucket"))
    thread = threading.Thread(target=probe.run, daemon=True)
    thread.start()
    try:
        from support.waiting import wait_until  # noqa: PLC0415

        wait_until(lambda: probe.probes >= 2, timeout=10, message="the probe did not ask")
        r2_proxy.up()
        wait_until(lambda: health.state == "up", timeout=10, message="the probe did not see the store back")
        asked = probe.probes
        stop.wait(0.3)
        assert probe.probes == asked  # silent while the store is up
    finally:
        stop.set()
        thread.join(5)


def test_bucket_wide_refusal_pauses_everything_and_parks_nothing(rig: dict[str, Any], r2_proxy: R2Proxy) -> None:
    """AccessDenied everywhere (HeadBucket too): the store is 'broken', the file waits uncounted, nothing is
    claimed. An AccessDenied on one key only (HeadBucket fine) parks that file and leaves the store 'up'."""
    journal: Journal = rig["journal"]
    uploader: Uploader = rig["uploader"]
    queue(rig, "a.png", b"a")
    r2_proxy.fail_all(status=403, code="AccessDenied")
    assert uploader.process(claim_one(journal)) == "paused"
    assert rig["health"].state == "broken" and journal.get(b"a.png").attempts == 0 and uploader.run_once() == 0
    r2_proxy.heal()
    rig["store"].check()
    rig["health"].observe("HeadBucket", "200")
    assert rig["health"].state == "up"
    r2_proxy.fail_all(status=403, code="AccessDenied", when=lambda r: r.key == "p/a.png")
    assert uploader.process(claim_one(journal)) == "failed"
    assert rig["health"].state == "up" and journal.get(b"a.png").error_class == "AccessDenied"


def test_no_credentials_pause_instead_of_stranding(tmp_path: Path, r2_proxy: R2Proxy, bucket: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials at all: not a crash that leaves the row 'uploading' but a bucket-scope NoCredentials:
    the store is 'broken' with a hint, the row pending with its error."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(r2_proxy.ca_bundle))
    settings = load_settings(bucket=bucket, endpoint_url=r2_proxy.endpoint, region="us-east-1")
    health = StoreHealth()
    store = S3Store(make_client(settings), bucket, observer=health.observe)
    journal = Journal(tmp_path / "journal.sqlite3")
    (tmp_path / "a.png").write_bytes(b"a")
    st = (tmp_path / "a.png").stat()
    journal.record([Candidate(b"a.png", st.st_size, st.st_mtime_ns, "close", st.st_ino, st.st_ctime_ns)])

    def factory(retry: Any, progress: Any) -> Transfer:
        return Transfer(store, tmp_path, Router.plain(KeyBuilder("p/{relpath}", "p")), multipart_threshold=5 * MIB,
                        part_size=5 * MIB, retry=retry, ledger=journal)

    uploader = Uploader(journal, factory, workers=1, policy=POLICY, metrics=Metrics(CollectorRegistry()),
                        health=health)
    assert uploader.process(claim_one(journal)) == "paused"
    row = journal.get(b"a.png")
    assert (row.state, row.error_class) == ("pending", "NoCredentials")
    assert health.state == "broken" and "SIDECAR_ACCESS_KEY_ID" in health.hint


class Raising:
    """A transfer that raises what it is given (to prove the uploader's outcome for each kind)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def run(self, row: FileRow) -> Result:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "error_class"),
    [(AttributeError("'NoneType' object has no attribute 'x'"), "AttributeError"),
     (OSError(errno.EIO, os.strerror(errno.EIO)), f"unreadable/{os.strerror(errno.EIO)}"),
     (OSError(errno.ESTALE, os.strerror(errno.ESTALE)), f"unreadable/{os.strerror(errno.ESTALE)}"),
     (FileChanged("a.png"), "FileChanged")],
    ids=["bug", "EIO", "ESTALE", "changing"],
)
def test_every_exception_becomes_a_counted_backed_off_retry(rig: dict[str, Any], exc: BaseException,
                                                            error_class: str) -> None:
    """A bug, a transient OS error (with its strerror) or a file that keeps changing: pending, one attempt
    counted, due later, the class in the journal -- never stranded 'uploading', never parked at once."""
    journal: Journal = rig["journal"]
    queue(rig, "a.png", b"a")
    rig["uploader"]._transfer = Raising(exc)
    assert rig["uploader"].process(claim_one(journal)) == "retry"
    row = journal.get(b"a.png")
    assert (row.state, row.attempts, row.error_class) == ("pending", 1, error_class)
    assert journal.next_due_in() > 0


def test_permanent_os_error_is_parked_with_its_strerror(rig: dict[str, Any]) -> None:
    """EACCES cannot pass by waiting: failed at once, the strerror kept."""
    journal: Journal = rig["journal"]
    queue(rig, "a.png", b"a")
    rig["uploader"]._transfer = Raising(OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert rig["uploader"].process(claim_one(journal)) == "failed"
    row = journal.get(b"a.png")
    assert row.state == "failed" and os.strerror(errno.EACCES) in (row.last_error or "")


def test_multipart_failure_leaves_no_progress_behind(rig: dict[str, Any], r2_proxy: R2Proxy, s3_server: S3Server,
                                                     bucket: str) -> None:
    """A multipart upload refused midway is aborted, parked, and takes its bytes out of the progress gauge."""
    queue(rig, "big.mp4", os.urandom(12 * MIB))
    r2_proxy.fail_all(status=403, code="AccessDenied", when=lambda r: r.part_number == 2)
    (row,) = rig["journal"].claim(1)
    assert rig["uploader"].process(row) == "failed"
    assert rig["registry"].get_sample_value("sidecar_upload_in_progress_bytes") == 0
    assert s3_server.direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert rig["journal"].orphans() == [] and rig["journal"].get(b"big.mp4").upload_id is None


def test_the_dispatcher_asks_when_rows_are_due_only_after_a_retry_and_still_sends_it_in_time(
    rig: dict[str, Any], r2_proxy: R2Proxy, s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """31 files queued at once cost a handful of next-due look-ups (3 here; before: 17,716, as the dispatcher spun
    while every worker was busy and rows were due); a file sent back to the journal with a backoff is sent again
    when due although nothing else wakes the dispatcher."""
    journal: Journal = rig["journal"]
    uploader: Uploader = rig["uploader"]
    asked = []
    real = journal.next_due_in
    monkeypatch.setattr(journal, "next_due_in", lambda: asked.append(1) or real())
    # three answers exhaust the in-process attempts: the row goes back to the journal, due about 1 s later
    r2_proxy.fail_next(3, status=400, code="BadDigest", when=lambda r: r.key == "p/retried.png")
    uploader.start()
    try:
        queue(rig, "retried.png", b"r")
        uploader.wake()
        for i in range(30):
            queue(rig, f"f{i:02d}.png", b"%d" % i)
            uploader.wake()
        expected = {f"p/f{i:02d}.png" for i in range(30)} | {"p/retried.png"}
        wait_until(lambda: set(s3_server.objects(bucket)) == expected, timeout=30)
    finally:
        uploader.stop(5)
    assert [r.status for r in r2_proxy.puts() if r.key == "p/retried.png"] == [400, 400, 400, 200]
    assert len(asked) < 10, f"{len(asked)} look-ups for 31 uploads"


def test_in_a_backlog_workers_take_their_next_file_with_the_last_ones_outcome(
    rig: dict[str, Any], s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30 files queued before the start: the dispatcher claims once per idle worker and the workers claim the
    rest in the journal write that records each upload (before: one claim transaction and one hand-off per
    file); every object holds its file's bytes and no row is left claimed."""
    journal: Journal = rig["journal"]
    uploader: Uploader = rig["uploader"]
    claims: list[int] = []
    with_outcome: list[int] = []
    real_claim, real_mark = journal.claim, journal.mark_uploaded

    def claim(limit: int) -> list[FileRow]:
        rows = real_claim(limit)
        claims.append(len(rows))
        return rows

    def mark(row: FileRow, **kw: Any) -> list[FileRow]:
        rows = real_mark(row, **kw)
        with_outcome.append(len(rows))
        return rows

    monkeypatch.setattr(journal, "claim", claim)
    monkeypatch.setattr(journal, "mark_uploaded", mark)
    files = {f"b{i:02d}.png": os.urandom(100 + i) for i in range(30)}
    for name, data in files.items():
        queue(rig, name, data)
    uploader.start()
    try:
        wait_until(lambda: journal.stats().get("uploaded", (0, 0))[0] == 30, timeout=30)
    finally:
        assert uploader.stop(5)
    assert s3_server.objects(bucket) == {f"p/{n}": d for n, d in files.items()}
    assert sum(with_outcome) == 28, (claims, with_outcome)  # every file but the first two came with an outcome
    assert sum(claims) == 2, claims  # the dispatcher's first claim, one row per worker
    assert journal.stats().get("uploading", (0, 0))[0] == 0


def test_rows_claimed_with_an_outcome_whose_report_fails_are_handed_back(
    rig: dict[str, Any], s3_server: S3Server, bucket: str,
) -> None:
    """A hook that raises after a success (a webhook outbox on a full journal, say) must not strand the rows
    the worker claimed in that same journal write: every file still ends uploaded, none stays claimed."""
    journal: Journal = rig["journal"]
    uploader: Uploader = rig["uploader"]
    calls: list[str] = []

    def on_stored(row: FileRow, result: Result) -> None:
        calls.append(result.key)
        if len(calls) == 1:
            raise RuntimeError("the hook failed")

    uploader.outcomes.on_stored = on_stored
    files = {f"h{i:02d}.png": os.urandom(50 + i) for i in range(12)}
    for name, data in files.items():
        queue(rig, name, data)
    uploader.start()
    try:
        wait_until(lambda: journal.stats()["uploaded"][0] == 12, timeout=30,
                   message="a row claimed with the failed outcome stayed claimed")
    finally:
        assert uploader.stop(5)
    assert journal.stats()["uploading"][0] == 0 and journal.stats()["pending"][0] == 0
    assert s3_server.objects(bucket) == {f"p/{n}": d for n, d in files.items()}
