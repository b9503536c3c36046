"""Faults: the store failing in every way a network can, the daemon killed at random, the journal's disk
filling up or its file going bad, and the kernel's inotify giving out. The daemon is ``sidecar run`` as a real
process talking to moto through the strict R2 proxy over https; faults come from the proxy, from signals and
from the kernel. Every test ends with :meth:`Rig.audit`: every file in the bucket byte-identical to its final
version on disk, no torn object, duplicates counted, and the errors the operator saw counted."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faults import (
    MIB,
    Rig,
    accepted_puts,
    journal_rows,
    metric,
    scrape,
    states,
    status,
    userns_available,
    userns_prefix,
)
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.scenarios import is_put, kill_loop, one_accepted_put_per_file, outage_under_stream, payload
from support.waiting import wait_until

from sidecar.journal import Candidate, Journal

OUTAGE_PROBES = int(os.environ.get("SIDECAR_OUTAGE_PROBES", "4"))  # probes the outage lasts for, at least


@pytest.fixture
def rig(tmp_path: Path, s3_server: S3Server, r2_proxy: R2Proxy, bucket: str) -> Iterator[Rig]:
    """A watched folder, a state folder and a bucket behind the strict https proxy; daemons stopped after."""
    r = Rig(tmp_path, s3_server, bucket, proxy=r2_proxy)
    yield r
    r.close()


# -- the store misbehaves ------------------------------------------------------------------------------------------


def test_outage_during_a_steady_stream_loses_nothing(rig: Rig) -> None:
    """S3 unreachable under a steady stream: files wait as pending, the outage is visible, then all upload once."""
    outage_under_stream(rig, outage_files=40, min_probes=OUTAGE_PROBES, scenario="S3 outage during a steady stream")


def test_throttling_storm_of_503_429_and_500_is_ridden_out(rig: Rig) -> None:
    """A storm of 503 SlowDown, 429 and 500 answers: every file still arrives once, each error class is counted."""
    assert rig.proxy is not None
    rig.proxy.fail_next(20, status=503, code="SlowDown", message="Reduce your request rate", when=is_put)
    rig.proxy.fail_next(20, status=429, code="TooManyRequests", message="Too many requests", when=is_put)
    rig.proxy.fail_next(10, status=500, code="InternalError", message="We encountered an internal error", when=is_put)
    daemon = rig.start()
    rng = random.Random(2)
    rels = [rig.write(f"storm/img_{i:03d}.png", payload(rng)) for i in range(30)]
    rig.wait_in_bucket(rels, timeout=60)
    rig.wait_idle(daemon)

    faulted = Counter(r.error_code for r in rig.proxy.puts() if r.origin == "fault")
    assert faulted == {"SlowDown": 20, "TooManyRequests": 20, "InternalError": 10}
    samples = scrape(daemon)
    for code in ("SlowDown", "TooManyRequests", "InternalError"):
        assert metric(samples, "sidecar_upload_retries_total", error_class=code) > 0, code
    assert metric(samples, "sidecar_uploads_total", outcome="failed") == 0
    assert states(rig.journal()) == {"uploaded": 30}
    one_accepted_put_per_file(rig)
    tally = rig.audit("Throttling storm (20x 503 SlowDown, 20x 429, 10x 500)")
    assert tally.duplicate_puts == 0 and tally.errors_reported > 0


def test_slow_store_within_the_timeout_costs_time_not_retries(rig: Rig) -> None:
    """Every request answered 0.5 s late (within the read timeout): all files arrive with no retry and one PUT each."""
    assert rig.proxy is not None
    rig.proxy.delay(0.5)
    daemon = rig.start(workers=4)
    rng = random.Random(3)
    rels = [rig.write(f"slow/img_{i:03d}.png", payload(rng)) for i in range(12)]
    rig.wait_in_bucket(rels)
    rig.wait_idle(daemon)

    assert not daemon.events("upload_retry_scheduled")
    assert Counter(r.operation for r in rig.proxy.requests) == {"PutObject": 12}
    tally = rig.audit("Slow store (every request +0.5 s)")
    assert tally.duplicate_puts == 0 and tally.errors_reported == 0


def test_store_slower_than_the_read_timeout_never_overwrites(rig: Rig) -> None:
    """Answers later than the read timeout: the late PUTs land, retries get 412, a HEAD settles it; no overwrite."""
    assert rig.proxy is not None
    rig.proxy.delay(1.5, when=is_put)
    daemon = rig.start(read_timeout_s=0.5, workers=2)
    rng = random.Random(4)
    for i in range(4):
        rig.write(f"late/img_{i:03d}.png", payload(rng))

    def retried_after_landing() -> bool:
        landed = {r.key for r in rig.proxy.puts() if r.status == 200}  # type: ignore[union-attr]
        refused = {r.key for r in rig.proxy.puts() if r.status == 412}  # type: ignore[union-attr]
        return len(landed) == 4 and len(refused) >= 1

    wait_until(retried_after_landing, timeout=60, message=rig.output)
    rig.proxy.delay(0)
    rig.wait_idle(daemon)

    assert accepted_puts(rig.proxy) == Counter(set(rig.expected()))  # each key written exactly once
    assert {r.status for r in rig.proxy.puts()} <= {200, 412}
    timeouts = [e for e in daemon.events("upload_retry_scheduled") if e.get("error_class") == "Timeout"]
    assert timeouts
    assert states(rig.journal()) == {"uploaded": 4}
    outcomes = Counter(e["outcome"] for e in daemon.events("upload_succeeded"))
    assert outcomes["existing"] >= 1  # recognised by 412 + HEAD with our MD5, not re-sent elsewhere
    tally = rig.audit("Store slower than the read timeout (PUT +1.5 s, timeout 0.5 s)")
    assert tally.variant_objects == 0
    assert tally.duplicate_puts >= 1  # refused by If-None-Match: counted, never written


def test_hung_store_is_escaped_by_timeouts_and_resumes_on_heal(rig: Rig) -> None:
    """A store that accepts requests and never answers: timeouts keep the daemon alive, files upload after heal."""
    assert rig.proxy is not None
    rig.proxy.hang(when=is_put)
    daemon = rig.start(read_timeout_s=0.5, connect_timeout_s=0.5)
    rng = random.Random(5)
    rels = [rig.write(f"hang/img_{i:03d}.png", payload(rng)) for i in range(10)]

    def timing_out() -> bool:
        return len([e for e in daemon.events("upload_retry_scheduled") if e.get("error_class") == "Timeout"]) >= 3

    wait_until(timing_out, timeout=40, message=rig.output)
    assert rig.keys() == set()
    assert daemon.is_running()
    rows = rig.journal()
    assert {rows[rel].state for rel in rels} <= {"pending", "uploading"}
    assert metric(scrape(daemon), "sidecar_upload_retries_total", error_class="Timeout") >= 3

    rig.proxy.heal()
    rig.wait_in_bucket(rels)
    rig.wait_idle(daemon)
    one_accepted_put_per_file(rig)
    tally = rig.audit("Hung store (PUTs never answered; read timeout 0.5 s), then healed")
    assert tally.duplicate_puts == 0


def test_connection_reset_after_the_body_is_retried_for_puts_and_parts(rig: Rig) -> None:
    """TCP resets after the body was sent, on PUTs and on multipart parts: every object completes, intact."""
    assert rig.proxy is not None
    rig.proxy.rules.min_part_size = 5 * MIB
    rig.proxy.reset_next(6, when=is_put)
    rig.proxy.reset_next(3, when=lambda r: r.operation == "UploadPart")
    daemon = rig.start(multipart_threshold_mb=5, part_size_mb=5)
    rng = random.Random(6)
    rels = [rig.write(f"reset/img_{i:03d}.png", payload(rng)) for i in range(12)]
    big = [rig.write(f"reset/clip_{i}.mp4", rng.randbytes(11 * MIB + i)) for i in range(2)]
    rig.wait_in_bucket(rels + big, timeout=60)
    rig.wait_idle(daemon)

    resets = Counter(r.operation for r in rig.proxy.requests if r.status == "reset")
    assert resets == {"PutObject": 6, "UploadPart": 3}
    assert rig.s3.direct.list_multipart_uploads(Bucket=rig.bucket).get("Uploads", []) == []
    assert metric(scrape(daemon), "sidecar_upload_retries_total", error_class="ConnectionError") > 0
    assert states(rig.journal()) == {"uploaded": 14}
    tally = rig.audit("Connection reset after the body (6 PUTs, 3 parts)")
    assert tally.duplicate_puts == 0


# -- the daemon is killed -------------------------------------------------------------------------------------------


def test_kill_9_during_a_multipart_upload_completes_it_and_aborts_the_orphan(rig: Rig) -> None:
    """SIGKILL between parts of a 16 MiB upload: after restart the object is complete and the orphan is aborted."""
    assert rig.proxy is not None
    rig.proxy.rules.min_part_size = 5 * MIB
    rig.proxy.delay(0.6, when=lambda r: r.operation == "UploadPart")
    settings = {"multipart_threshold_mb": 5, "part_size_mb": 5}
    daemon = rig.start(**settings)
    rel = rig.write("video/clip_00001_.mp4", random.Random(7).randbytes(16 * MIB + 12_345))

    def part_landed() -> str | None:
        row = rig.journal().get(rel)
        done = [r for r in rig.proxy.parts() if r.status == 200]
        return row.upload_id if row is not None and row.upload_id and done else None

    upload_id = wait_until(part_landed, timeout=30, message=rig.output)
    assert daemon.kill() == -signal.SIGKILL
    open_uploads = rig.s3.direct.list_multipart_uploads(Bucket=rig.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in open_uploads] == [upload_id]

    rig.proxy.delay(0)
    daemon = rig.start(**settings)
    rig.wait_in_bucket([rel])
    rig.wait_idle(daemon)

    assert rig.s3.direct.list_multipart_uploads(Bucket=rig.bucket).get("Uploads", []) == []
    aborts = [r for r in rig.proxy.requests if r.operation == "AbortMultipartUpload"]
    assert [(r.upload_id, r.status) for r in aborts] == [(upload_id, 204)]
    assert [e["key"] for e in daemon.events("multipart_orphan_aborted")] == [rig.key(rel)]
    row = rig.journal()[rel]
    assert (row.state, row.upload_id) == ("uploaded", None)
    completes = [r for r in rig.proxy.requests if r.operation == "CompleteMultipartUpload"]
    assert [r.status for r in completes] == [200]
    tally = rig.audit("kill -9 during a multipart upload (16 MiB, 5 MiB parts)")
    assert tally.duplicate_puts == 0


CI_KILLS = int(os.environ.get("SIDECAR_CI_KILLS", "4"))  # the full version (>= 20 kills) is in test_soak.py


def test_kill_9_at_random_moments_during_a_burst(rig: Rig) -> None:
    """SIGKILL a few times at random moments of a burst: all files arrive intact; re-uploads ≤ uploads in flight."""
    kill_loop(rig, CI_KILLS, seed=11)


# -- the journal's disk and file --------------------------------------------------------------------------------------

needs_userns = pytest.mark.skipif(not userns_available(), reason="unshare -U -r is not permitted here")


def fill_disk(path: Path) -> int:
    """Write ``path`` until the filesystem says ENOSPC; returns the bytes written.

    Unbuffered: a buffered file would keep the rest of a short write and raise ENOSPC again from close().
    """
    written = 0
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        while True:
            written += os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return written


def journal_errors(rig: Rig) -> list[dict[str, object]]:
    return [line for proc in rig.procs for line in proc.log_lines()
            if "disk is full" in json.dumps(line) or "disk full" in json.dumps(line)]


@needs_userns
def test_journal_disk_full_is_reported_and_recovers_without_restart(rig: Rig) -> None:
    """The journal's disk fills mid-run: errors are logged, nothing is lost, all upload once space is back."""
    assert rig.proxy is not None
    rig.state.mkdir()
    daemon = rig.start(prefix=userns_prefix(tmpfs=rig.state, tmpfs_kib=1024))
    view = Path(f"/proc/{daemon.pid}/root") / rig.state.relative_to("/")  # the daemon's private tmpfs
    db = view / "journal.sqlite3"
    rng = random.Random(21)
    before = [rig.write(f"before/img_{i}.png", payload(rng)) for i in range(5)]
    rig.wait_in_bucket(before)

    rig.proxy.delay(1.5, when=is_put)  # these are claimed, then the disk fills while their PUTs are in flight
    inflight = [rig.write(f"inflight/img_{i}.png", payload(rng)) for i in range(3)]
    wait_until(lambda: states({r: journal_rows(db).get(r) for r in inflight if r in journal_rows(db)}  # type: ignore[misc]
                              )["uploading"] == 3, timeout=20, message=rig.output)
    filled = fill_disk(view / "filler")
    during = [rig.write(f"during/img_{i}.png", payload(rng)) for i in range(5)]
    wait_until(lambda: len(daemon.events("journal_write_failed")) == 3, timeout=30, message=rig.output)
    wait_until(lambda: daemon.events("settle_loop_failed"), timeout=30, message=rig.output)
    rig.proxy.delay(0)
    assert daemon.is_running()
    assert {rig.key(rel) for rel in inflight} <= rig.keys()  # the PUTs landed; their outcome was refused
    assert rig.keys().isdisjoint(rig.key(rel) for rel in during)  # not journaled, so not uploaded (yet)

    (view / "filler").unlink()
    rig.wait_in_bucket(during)
    rig.wait_idle(daemon)
    assert states(journal_rows(db)) == {"uploaded": 13}
    assert len(daemon.events("journal_read_failed")) <= 5  # about one a second while full, not a flood
    one_accepted_put_per_file(rig)
    existing = [e["path"] for e in daemon.events("upload_succeeded") if e["outcome"] == "existing"]
    assert sorted(existing) == sorted(inflight)  # recognised by 412 + HEAD, not sent twice
    tally = rig.audit("Journal disk full (1 MiB tmpfs filled mid-run), then freed", filler_bytes=filled,
                      journal_error_lines=len(journal_errors(rig)))
    assert tally.duplicate_puts == 3 and tally.variant_objects == 0
    assert tally.errors_reported > 0


def corrupt_journal(path: Path, how: str) -> None:
    """Make a journal of 2,000 files, then damage it: ``garbage`` (not a database) or ``index`` (torn pages of
    the path index only: the header and the table are fine, so only a check at open notices)."""
    journal = Journal(path)
    journal.record([Candidate(f"old/img_{i:05d}.png".encode(), 100 + i, 10**18 + i, "scan") for i in range(2000)])
    journal.close()
    if how == "garbage":
        path.write_bytes(b"this is not a journal\n" * 500)
        return
    db = sqlite3.connect(path)
    pages = [r[0] for r in db.execute("SELECT pageno FROM dbstat WHERE name = 'sqlite_autoindex_files_1' "
                                      "AND pagetype = 'leaf'")]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    rng = random.Random(31)
    with path.open("r+b") as f:
        for page in pages:
            f.seek((page - 1) * size)
            f.write(rng.randbytes(size))


@pytest.mark.parametrize("how", ["garbage", "index"])
def test_corrupt_journal_at_start_is_moved_aside_and_rebuilt(rig: Rig, how: str) -> None:
    """A corrupt journal (not a database, or torn index pages) is no crash loop: the daemon moves it aside
    (bytes kept for a post-mortem), says so at error level once, counts it, and uploads the tree."""
    rig.state.mkdir()
    journal = rig.state / "journal.sqlite3"
    corrupt_journal(journal, how)
    damaged = journal.read_bytes()
    rel = rig.write("new/img.png", b"fresh")
    daemon = rig.start()
    rig.wait_in_bucket([rel])
    rig.wait_idle(daemon)
    assert "Traceback" not in daemon.raw_stderr() + daemon.raw_stdout()
    (event,) = daemon.events("journal_rebuilt")
    assert event["level"] == "error" and Path(event["moved_to"]).read_bytes() == damaged
    assert metric(scrape(daemon), "sidecar_journal_problems_total", problem="rebuilt") == 1
    assert states(rig.journal()) == {"uploaded": 1}
    tally = rig.audit(f"Journal corrupt at start ({how}): moved aside, rebuilt")
    assert tally.in_bucket_identical == 1 and tally.duplicate_puts == 0


@pytest.mark.parametrize("when", ["stopped", "running"])
def test_deleted_journal_is_rebuilt_without_uploading_different_bytes(rig: Rig, when: str) -> None:
    """Journal deleted (daemon stopped, or running then killed): the rescan recognises every object by 412 + HEAD."""
    assert rig.proxy is not None
    rng = random.Random(32)
    rels = [rig.write(f"day/img_{i:03d}.png", payload(rng)) for i in range(25)]
    daemon = rig.start()
    rig.wait_in_bucket(rels)
    rig.wait_idle(daemon)
    if when == "stopped":
        assert daemon.terminate() == 0
        shutil.rmtree(rig.state)
    else:
        for name in os.listdir(rig.state):
            os.unlink(rig.state / name)  # the daemon keeps writing to the unlinked inode
        more = [rig.write(f"day/late_{i:03d}.png", payload(rng)) for i in range(5)]
        rig.wait_in_bucket(more)
        rels += more
        assert daemon.kill() == -signal.SIGKILL
        assert not (rig.state / "journal.sqlite3").exists()
    objects_before = rig.objects()
    rig.proxy.clear()

    daemon = rig.start()
    wait_until(lambda: len(rig.journal()) == len(rels), timeout=30, message=rig.output)
    rig.wait_idle(daemon)
    assert rig.objects() == objects_before  # nothing new, nothing overwritten
    calls = Counter((r.operation, r.status) for r in rig.proxy.requests)
    assert calls == {("PutObject", 412): len(rels), ("HeadObject", 200): len(rels)}
    assert states(rig.journal()) == {"uploaded": len(rels)}
    outcomes = Counter(e["outcome"] for e in daemon.events("upload_succeeded"))
    assert outcomes == {"existing": len(rels)}
    tally = rig.audit(f"Journal deleted ({when}), rebuilt by the startup scan", refused_puts=len(rels))
    assert tally.variant_objects == 0


# -- the kernel's inotify gives out -----------------------------------------------------------------------------------


def test_inotify_queue_overflow_is_reported_and_rescanned(rig: Rig) -> None:
    """The kernel's event queue overflows while the daemon is frozen: watcher_overflow, a rescan, nothing lost."""
    daemon = rig.start()
    rng = random.Random(41)
    warm = rig.write("warm.png", payload(rng))
    rig.wait_in_bucket([warm])
    assert daemon.pid is not None
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    os.kill(daemon.pid, signal.SIGSTOP)  # the reader cannot drain the queue: the kernel drops what does not fit
    try:
        junk = [rig.out / "churn-a.txt", rig.out / "churn-b.txt"]  # ignored by the filter; alternating: no merging
        for n in range(limit + limit // 4):
            junk[n % 2].open("wb").close()
        lost = [rig.write(f"after-overflow/img_{i:03d}.png", payload(rng)) for i in range(30)]
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    rig.wait_in_bucket(lost)
    rig.wait_idle(daemon)

    assert len(daemon.events("watcher_overflow")) == 1  # one overflow, reported once (watchdog logs it twice)
    assert [e for e in daemon.events("scan_completed") if e["trigger"] == "overflow"]
    samples = scrape(daemon)
    assert metric(samples, "sidecar_watcher_overflows_total") == 1
    assert metric(samples, "sidecar_rescans_total", trigger="overflow") >= 1
    one_accepted_put_per_file(rig)
    tally = rig.audit(f"inotify queue overflow ({limit + limit // 4} events queued while frozen)",
                      overflows=metric(samples, "sidecar_watcher_overflows_total"))
    assert tally.duplicate_puts == 0 and tally.errors_reported >= 1


@needs_userns
@pytest.mark.parametrize("limit", ["max_watches", "max_instances"])
def test_no_inotify_at_all_falls_back_to_polling_and_says_so(rig: Rig, limit: str) -> None:
    """Watch or instance limit of 0 (a namespace's own limits): the daemon polls, names the limit, and loses
    nothing."""
    daemon = rig.start(prefix=userns_prefix(**{limit: 0}))
    degraded = wait_until(lambda: daemon.events("watcher_degraded"), timeout=10, message=rig.output)
    named = {"max_watches": "inotify watch limit reached", "max_instances": "inotify instance limit reached"}[limit]
    assert degraded[0]["mode"] == "polling" and degraded[0]["reason"].startswith(named)
    rng = random.Random(42)
    rels = [rig.write(f"polled/sub_{i % 3}/img_{i:03d}.png", payload(rng)) for i in range(12)]
    rig.wait_in_bucket(rels)
    rig.wait_idle(daemon)
    samples = scrape(daemon)
    assert metric(samples, "sidecar_watcher_mode", mode="polling") == 1
    assert metric(samples, "sidecar_watcher_mode", mode="inotify") == 0
    assert status(daemon)["watcher"]["degraded_reason"].startswith(named)
    one_accepted_put_per_file(rig)
    tally = rig.audit(f"No inotify ({limit} = 0 in a user namespace): polling fallback", reason=degraded[0]["reason"])
    assert tally.errors_reported >= 1


@needs_userns
def test_watch_limit_on_new_subfolders_is_noticed_and_polled(rig: Rig) -> None:
    """Watch limit hit by new subfolders (silently skipped by inotify): the daemon notices, polls, loses nothing."""
    daemon = rig.start(prefix=userns_prefix(max_watches=3))  # the root and two folders
    rng = random.Random(43)
    firsts = [rig.write(f"day_{d}/img_000.png", payload(rng)) for d in range(5)]  # folder scans find these
    rig.wait_in_bucket(firsts)
    degraded = wait_until(lambda: daemon.events("watcher_degraded"), timeout=10, message=rig.output)
    assert degraded[0]["mode"] == "polling" and "watch limit" in degraded[0]["reason"]
    later = [rig.write(f"day_{d}/img_{i:03d}.png", payload(rng)) for d in range(5) for i in range(1, 4)]
    rig.wait_in_bucket(later, timeout=20)  # in unwatched folders: only polling (or a 5-min scan) sees them
    rig.wait_idle(daemon)
    samples = scrape(daemon)
    assert metric(samples, "sidecar_watcher_mode", mode="polling") == 1
    assert metric(samples, "sidecar_watcher_restarts_total", reason="watch_limit") == 1
    assert "watch limit" in status(daemon)["watcher"]["degraded_reason"]
    one_accepted_put_per_file(rig)
    tally = rig.audit("inotify watch limit hit by new subfolders (limit 3 in a user namespace)",
                      reason=degraded[0]["reason"])
    assert tally.errors_reported >= 1


@needs_userns
def test_watch_limit_already_exceeded_at_start_is_noticed_and_polled(rig: Rig) -> None:
    """A tree with more folders than the watch limit at start: polling from the start, said so, nothing lost."""
    rng = random.Random(44)
    old = [rig.write(f"old_{d}/img_000.png", payload(rng)) for d in range(6)]
    daemon = rig.start(prefix=userns_prefix(max_watches=3))
    degraded = wait_until(lambda: daemon.events("watcher_degraded"), timeout=10, message=rig.output)
    assert degraded[0]["mode"] == "polling" and "watch limit" in degraded[0]["reason"]
    rig.wait_in_bucket(old)
    new = [rig.write(f"old_{d}/img_001.png", payload(rng)) for d in range(6)]
    rig.wait_in_bucket(new, timeout=20)
    rig.wait_idle(daemon)
    assert metric(scrape(daemon), "sidecar_watcher_mode", mode="polling") == 1
    one_accepted_put_per_file(rig)
    rig.audit("inotify watch limit already exceeded at start (6 folders, limit 3)", reason=degraded[0]["reason"])


def test_deaf_watcher_after_the_root_is_replaced_is_rebuilt_and_rescanned(rig: Rig) -> None:
    """The watched root deleted and recreated (its watch died with it): noticed, rebuilt, rescanned, nothing lost."""
    daemon = rig.start()
    rng = random.Random(45)
    warm = rig.write("warm.png", payload(rng))
    rig.wait_in_bucket([warm])
    shutil.rmtree(rig.out)
    rig.out.mkdir()
    after = [rig.write(f"{'' if i % 2 else 'sub/'}img_{i:03d}.png", payload(rng)) for i in range(10)]
    rig.wait_in_bucket(after, timeout=30)
    rig.wait_idle(daemon)

    degraded = daemon.events("watcher_degraded")
    assert degraded and degraded[0]["reason"] == "root_replaced"
    assert daemon.events("watcher_restarted")
    assert [e for e in daemon.events("scan_completed") if e["trigger"] == "watcher_restart"]
    assert metric(scrape(daemon), "sidecar_watcher_restarts_total", reason="root_replaced") >= 1
    wait_until(lambda: metric(scrape(daemon), "sidecar_watcher_up") == 1, timeout=15,  # the canary proves it again
               message=rig.output)
    one_accepted_put_per_file(rig)
    tally = rig.audit("Deaf watcher: watched root deleted and recreated")
    assert tally.errors_reported >= 1


# -- the file changes under the upload --------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["rewritten", "truncated"])
def test_file_changed_during_a_multipart_upload_never_leaves_a_torn_object(rig: Rig, change: str) -> None:
    """A 16 MiB file rewritten or truncated between parts: the upload is aborted, the final content arrives whole."""
    assert rig.proxy is not None
    rig.proxy.rules.min_part_size = 5 * MIB
    rig.proxy.delay(0.5, when=lambda r: r.operation == "UploadPart")
    daemon = rig.start(multipart_threshold_mb=5, part_size_mb=5)
    rng = random.Random(46)
    rel = rig.write("video/clip.mp4", rng.randbytes(16 * MIB))
    wait_until(lambda: [r for r in rig.proxy.parts() if r.status == 200], timeout=30, message=rig.output)  # type: ignore[union-attr]
    final = rng.randbytes(16 * MIB) if change == "rewritten" else rng.randbytes(7 * MIB)
    with rig.path(rel).open("r+b") as f:  # in place, same inode, like a writer that reopens its output
        f.write(final)
        f.truncate(len(final))
    rig.remember(rel, final)
    rig.proxy.delay(0)
    rig.wait_in_bucket([rel])
    rig.wait_idle(daemon)

    assert rig.objects() == {rig.key(rel): final}
    aborted = [r for r in rig.proxy.requests if r.operation == "AbortMultipartUpload"]
    assert [r.status for r in aborted] == [204]
    assert rig.s3.direct.list_multipart_uploads(Bucket=rig.bucket).get("Uploads", []) == []
    samples = scrape(daemon)  # read again later like any retry: backed off, counted
    assert metric(samples, "sidecar_upload_retries_total", error_class="FileChanged") == 1
    assert metric(samples, "sidecar_uploads_total", outcome="retry") == 1
    completes = [r.status for r in rig.proxy.requests if r.operation == "CompleteMultipartUpload"]
    assert completes == [200]  # one upload at a time per file: never two multipart uploads racing on one key
    tally = rig.audit(f"File {change} during a multipart upload (16 MiB)")
    assert tally.variant_objects == 0 and tally.torn_or_foreign == 0 and tally.duplicate_puts == 0


def test_file_rewritten_during_a_put_keeps_each_version_whole(rig: Rig) -> None:
    """A small file rewritten while its PUT is in flight: the key keeps the complete first version, the final
    version follows under its content-hash variant; nothing torn, nothing overwritten."""
    assert rig.proxy is not None
    rig.proxy.delay(1.0, when=is_put)
    daemon = rig.start()
    rng = random.Random(47)
    rel = rig.write("img/ComfyUI_00001_.png", payload(rng, 40_000, 40_001))
    wait_until(lambda: rig.journal().get(rel) and rig.journal()[rel].state == "uploading", timeout=20,  # type: ignore[return-value]
               message=rig.output)
    final = payload(rng, 20_000, 20_001)
    rig.write(rel, final)  # truncate and rewrite in place
    rig.proxy.delay(0)
    wait_until(lambda: len(accepted_puts(rig.proxy)) == 2, timeout=30, message=rig.output)  # type: ignore[arg-type]
    rig.wait_idle(daemon)

    objects = rig.objects()
    first = rig.versions[rel][0]
    variant = f"{rig.key(rel)[:-4]}.{hashlib.md5(final).hexdigest()[:12]}.png"
    assert objects == {rig.key(rel): first, variant: final}
    assert [e["taken_key"] for e in daemon.events("key_taken_stored_as_variant")] == [rig.key(rel)]
    tally = rig.audit("File rewritten while its PUT is in flight", final_key=variant)
    assert tally.torn_or_foreign == 0 and tally.variant_objects == 1
