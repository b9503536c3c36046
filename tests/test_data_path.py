"""The data path end to end, as real processes: one daemon per journal, the journal's own faults, the
store's outage and recovery, a lying store -- each through the R2-strict proxy to a real moto server."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.container import report
from support.e2e import World
from support.waiting import wait_until

MIB = 1024 * 1024


def test_second_run_and_scan_beside_a_daemon_exit_2_and_abort_nothing(world: World) -> None:
    """A multipart upload in flight; a second `sidecar run` and a `sidecar scan` on the same state folder
    each exit 2 with one line naming the holder's PID, touch no row, abort no upload; the file lands."""
    world.proxy.delay(0.4, when=lambda r: r.operation == "UploadPart")
    first = world.start(multipart_threshold_mb=5, part_size_mb=5)
    big = os.urandom(16 * MIB)
    world.path(world.remember("big.mp4", big)).write_bytes(big)
    wait_until(lambda: world.proxy.select(operation="UploadPart"), timeout=30, message=first.output)
    for command in ("run", "scan"):
        code, out, err = world.cli(command, http_port=0)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (command, out, err)
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "one daemon per journal" in lines[0], err
    world.proxy.delay(0)
    world.wait_in_bucket(["big.mp4"], first)
    assert world.objects() == {world.key("big.mp4"): big}
    assert world.proxy.select(operation="AbortMultipartUpload") == []


def test_retry_failed_beside_a_running_daemon_is_picked_up(world: World) -> None:
    """`retry-failed` needs no lock: a file parked by an object-scope 403 is uploaded within seconds of it."""
    world.proxy.fail_all(status=403, code="AccessDenied", when=lambda r: r.operation == "PutObject")
    proc = world.start()
    world.path(world.remember("a.png", b"png" * 100)).write_bytes(world.written["a.png"])
    wait_until(lambda: world.journal().get("a.png") and world.journal()["a.png"].state == "failed", timeout=30,
               message=proc.output)
    assert world.status(proc)["store"]["state"] == "up"  # one key refused is not a broken store
    world.proxy.heal()
    code, out, err = world.cli("retry-failed")
    assert code == 0 and "requeued 1" in out, err
    world.wait_in_bucket(["a.png"], proc, timeout=15)


def test_deleted_journal_is_detected_and_the_restart_uploads_nothing_twice(world: World) -> None:
    """The journal deleted under the running daemon: an error line, the process exits 1 (supervisord
    restarts it); the restarted daemon rebuilds the journal from the tree, recognises the stored file by a
    412 and a HEAD, and uploads nothing twice."""
    proc = world.start()
    world.path(world.remember("a.png", b"a" * 500)).write_bytes(world.written["a.png"])
    world.wait_in_bucket(["a.png"], proc)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{world.state / 'journal.sqlite3'}{suffix}").unlink(missing_ok=True)
    assert proc.wait(30) == 1, proc.output()
    (event,) = proc.events("journal_unusable")
    assert event["level"] == "error" and event["kind"] == "deleted"
    again = world.start()
    world.wait_idle(again)
    puts = [r for r in world.proxy.puts() if r.key == world.key("a.png")]
    assert [r.status for r in puts] == [200, 412] and world.objects() == world.expected()


def test_corrupt_journal_is_moved_aside_not_a_crash_loop(world: World) -> None:
    """A journal that is not a database: the daemon starts, logs journal_rebuilt at error with where the
    damaged file went, counts it, and uploads the tree (stored files are not uploaded again)."""
    world.state.mkdir(parents=True, exist_ok=True)
    (world.state / "journal.sqlite3").write_bytes(b"garbage" * 1000)
    world.path(world.remember("a.png", b"a" * 300)).write_bytes(world.written["a.png"])
    proc = world.start()
    world.wait_in_bucket(["a.png"], proc)
    (event,) = proc.events("journal_rebuilt")
    assert event["level"] == "error" and Path(event["moved_to"]).read_bytes() == b"garbage" * 1000
    metrics = world.metrics(proc)
    assert 'sidecar_journal_problems_total{problem="rebuilt"} 1.0' in metrics


def test_outage_first_upload_within_two_seconds_of_the_store_answering(world: World) -> None:
    """The store unreachable for a while with files queued: `store_unavailable` at error, /readyz 503, no
    claim and no busy loop; once the store answers, the first upload follows within 2 s and
    `store_recovered` reports the real outage length."""
    proc = world.start()
    world.proxy.down()
    (world.out / "o").mkdir()
    for n in range(20):
        world.path(world.remember(f"o/{n:02d}.png", os.urandom(2000))).write_bytes(world.written[f"o/{n:02d}.png"])
    wait_until(lambda: proc.events("store_unavailable"), timeout=30, message=proc.output)
    assert proc.events("store_unavailable")[0]["level"] == "error"
    outage_started = time.monotonic()
    wait_until(lambda: world.status(proc)["counts"]["pending"]["files"] == 20, timeout=30, message=proc.output)
    cpu_before = _cpu_s(proc.pid)
    time.sleep(3.0)  # a measured idle window: the CPU a paused daemon burns in it
    idle_cpu = _cpu_s(proc.pid) - cpu_before
    assert world.ready(proc) == 503
    world.proxy.up()
    back = time.monotonic()
    world.wait_in_bucket([f"o/{n:02d}.png" for n in range(1)], proc, timeout=30)
    first_upload_s = time.monotonic() - back
    world.wait_in_bucket(list(world.written), proc, timeout=30)
    (recovered,) = proc.events("store_recovered")
    outage_s = back - outage_started
    report("outage", first_upload_after_store_back_s=round(first_upload_s, 2),
           store_recovered_outage_s=recovered["outage_s"], observed_outage_s=round(outage_s, 2),
           cpu_while_paused_ms_per_s=round(idle_cpu * 1000 / 3, 1), files=len(world.written))
    assert first_upload_s <= 2.0
    assert outage_s <= recovered["outage_s"] <= outage_s + 30
    assert idle_cpu < 0.3  # a busy loop burns a whole core: 3 s
    assert world.objects() == world.expected()


def test_blackhole_is_detected_by_the_first_timed_out_request(world: World) -> None:
    """Connect works, nothing answers: the first timed-out request makes the store unreachable (one error
    line, the gauge 0) within the read timeout, not minutes later."""
    proc = world.start(read_timeout_s=2)
    world.proxy.hang()
    started = time.monotonic()
    world.path(world.remember("a.png", b"a" * 100)).write_bytes(world.written["a.png"])
    wait_until(lambda: proc.events("store_unavailable"), timeout=30, message=proc.output)
    detected_s = time.monotonic() - started
    assert detected_s < 2 + 8  # the read timeout, plus settling and the first request's start
    assert "sidecar_store_reachable 0.0" in world.metrics(proc)
    world.proxy.heal()
    world.wait_in_bucket(["a.png"], proc, timeout=30)


@pytest.mark.parametrize("forward", [False, True], ids=["store-kept-nothing", "store-kept-it"])
def test_store_answering_200_without_etag_is_not_believed(world: World, forward: bool) -> None:
    """A store that answers 200 without an ETag: the row is not 'uploaded' on that answer; the retry
    settles it (a PUT, or a 412 and a HEAD showing our MD5), and the bucket ends byte-identical."""
    world.proxy.answer_without_etag(1, forward=forward, when=lambda r: r.operation == "PutObject")
    proc = world.start(retry_base_s=0.2)
    world.path(world.remember("a.png", b"a" * 700)).write_bytes(world.written["a.png"])
    world.wait_in_bucket(["a.png"], proc)  # idle alone can come before the watcher has seen the file
    world.wait_idle(proc, timeout=30)
    assert world.objects() == world.expected()
    statuses = [r.status for r in world.proxy.puts()]
    assert statuses == [200, 412 if forward else 200]
    assert any(e.get("error_class") == "ETagMissing" for e in proc.events("upload_retry_scheduled"))


def test_same_size_same_mtime_replacement_is_uploaded(world: World) -> None:
    """A file renamed over another with the same size and mtime (another inode) is a new version: its bytes
    are stored (under the variant key, the first object is never overwritten)."""
    proc = world.start()
    target = world.path("a.png")
    target.write_bytes(b"1" * 100)
    world.wait_in_bucket(["a.png"], proc)
    st = target.stat()
    replacement = world.out / ".a.png.tmp"
    replacement.write_bytes(b"2" * 100)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(replacement, target)
    wait_until(lambda: len(world.objects()) == 2, timeout=30, message=proc.output)
    assert sorted(world.objects().values()) == [b"1" * 100, b"2" * 100]
    assert world.objects()[world.key("a.png")] == b"1" * 100
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def _cpu_s(pid: int | None) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_folder_moved_out_of_the_tree_keeps_its_files_visible_as_vanished(world: World) -> None:
    """Pending files in a folder renamed out of the watched tree are not dropped silently: each becomes
    `skipped`/vanished, logged at warning, and listed in /status `recent_skipped`."""
    world.proxy.fail_all(status=503, code="SlowDown", when=lambda r: r.operation == "PutObject")
    proc = world.start(retry_base_s=0.5)
    (world.out / "batch").mkdir()
    for n in range(3):
        (world.out / "batch" / f"{n}.png").write_bytes(b"x" * (100 + n))
    wait_until(lambda: len([r for r in world.journal().values() if r.last_error]) == 3, timeout=30,
               message=proc.output)
    os.rename(world.out / "batch", world.tmp_path / "moved-away")
    world.proxy.heal()
    wait_until(lambda: len(proc.events("upload_skipped")) == 3, timeout=30, message=proc.output)
    assert {(e["level"], e["reason"]) for e in proc.events("upload_skipped")} == {("warning", "vanished")}
    skipped = world.status(proc)["recent_skipped"]
    assert sorted(s["path"] for s in skipped) == [f"batch/{n}.png" for n in range(3)]
    assert {s["error_class"] for s in skipped} == {"vanished"} and world.objects() == {}


def test_filesystem_mounted_over_a_subfolder_later_is_watched(world: World) -> None:
    """A tmpfs mounted over a watched subfolder after the daemon started hides it from inotify; the daemon
    notices the mount within a maintenance cycle, rebuilds the watcher and uploads what is written there,
    instead of waiting for the periodic scan (300 s)."""
    proc = world.start()
    sub = world.out / "mnt"
    sub.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "sidecar-test", str(sub)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        data = os.urandom(3000)
        world.path(world.remember("mnt/ComfyUI_00001_.png", data)).write_bytes(data)
        world.wait_in_bucket(["mnt/ComfyUI_00001_.png"], proc, timeout=20)
        # the upload may come first (the new folder's own scan can find the file): wait for the notice itself
        (event,) = wait_until(lambda: proc.events("mounts_changed"), timeout=20, message="mount not noticed")
        assert event["added"] == ["mnt"] and event["level"] == "warning"
        assert world.objects() == world.expected()
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=False)
