"""End to end: ``sidecar run`` as a real process, real inotify, S3 traffic through the strict R2 proxy (https)
in front of the moto server; the bucket is read directly from moto, the journal through a read-only
SQLite connection."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.e2e import (
    POD_ID,
    World,
    states,
    write_at_once,
    write_in_chunks,
    write_renamed_while_open,
    write_via_tmp,
)
from support.waiting import wait_until

CHUNK_PAUSE_S = 0.12  # longer than SIDECAR_SETTLE_S (0.05): a held, growing file must not look settled


def payload(rng: random.Random) -> bytes:
    """Small unique content (moto keeps every object in RAM)."""
    return rng.randbytes(rng.randint(1_000, 24_000))


def write_burst(w: World, tag: str, *, folders: int, renamed: int, chunked: int, seed: int) -> list[str]:
    """Write a burst like a busy ComfyUI pod: new subfolders, tmp-then-rename writers and in-place chunked
    writers (fd held open between chunks) all at once. Returns the final relative paths."""
    rng = random.Random(seed)
    jobs: list[tuple[str, bytes]] = [(f"{tag}chunked/ComfyUI_{i:05d}_.png", payload(rng)) for i in range(chunked)]
    rels = [w.remember(rel, data) for rel, data in jobs]
    (w.out / f"{tag}chunked").mkdir(parents=True, exist_ok=True)

    def chunked_writer(items: list[tuple[str, bytes]]) -> None:
        for rel, data in items:
            write_in_chunks(w.path(rel), data, chunks=3, pause_s=CHUNK_PAUSE_S)

    lanes = [jobs[n::20] for n in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(chunked_writer, lane) for lane in lanes if lane]
        for i in range(folders):  # new folders: mkdir, then write at once, before any watch on them exists
            folder = f"{tag}batch_{i // 4:02d}" if i % 8 < 4 else f"{tag}p %date:yyyy-MM-dd%/héros {i // 8}"
            rel = w.remember(f"{folder}/ComfyUI_{i:05d}_.png", payload(rng))
            write_at_once(w.path(rel), w.written[rel])
            rels.append(rel)
        (w.out / f"{tag}renamed").mkdir(parents=True, exist_ok=True)
        for i in range(renamed):
            rel = w.remember(f"{tag}renamed/out_{i:03d}.{('png', 'webp', 'mp4')[i % 3]}", payload(rng))
            name = rel.rsplit("/", 1)[1]
            if i % 5 == 4:
                write_renamed_while_open(w.path(rel), w.written[rel], f".tmp{i:04x}")  # safetensors-style
            else:
                write_via_tmp(w.path(rel), w.written[rel], f"{name}.tmp" if i % 2 else f".{name}.tmp")
            rels.append(rel)
        for future in futures:
            future.result()
    return rels


@pytest.mark.slow
def test_burst_of_300_files_reaches_the_bucket_once_each_and_only_when_complete(world: World) -> None:
    """300 files written at once (new folders, tmp+rename, chunked in place) arrive byte-identical, one PUT each."""
    (world.out / "renamed").mkdir()  # watched before the burst, so its renames arrive as moved events
    daemon = world.start()
    rels = write_burst(world, "", folders=100, renamed=100, chunked=100, seed=1)
    assert len(set(rels)) == 300

    world.wait_in_bucket(rels, daemon)
    status = world.wait_idle(daemon)

    expected = world.expected()
    assert world.bucket_diff(expected) == []  # every file, byte-identical, and nothing else (no tmp names)
    assert Counter(r.operation for r in world.proxy.requests) == {"PutObject": 300}  # no HEAD, no LIST
    assert {key: len(reqs) for key, reqs in world.puts_by_key().items()} == dict.fromkeys(expected, 1)
    assert all(r.status == 200 for r in world.proxy.puts())
    assert world.complete_puts_only(expected) == []  # no PUT ever carried a partial file
    assert status["counts"]["uploaded"]["files"] == 300
    assert states(world.journal()) == {"uploaded": 300}
    assert not daemon.events("upload_failed")
    sources = {e["source"] for e in daemon.events("upload_succeeded")}
    # In-place writers are found by their close events; a rename into a fresh folder may be found first by
    # that folder's scan, so "move" is not guaranteed under load.
    assert "close" in sources and sources <= {"close", "move", "create", "scan"}, sources


def test_restart_with_nothing_changed_sends_no_request_and_uploads_only_new_files(world: World) -> None:
    """A restart over an unchanged tree costs zero requests; files written while stopped are uploaded once."""
    rng = random.Random(2)
    first = [world.remember(f"day1/img_{i:03d}.png", payload(rng)) for i in range(10)]
    for rel in first:
        write_at_once(world.path(rel), world.written[rel])
    daemon = world.start()
    world.wait_in_bucket(first, daemon)
    world.wait_idle(daemon)
    assert daemon.terminate() == 0

    world.proxy.clear()
    os.utime(world.path(first[0]))  # touched, same bytes: checked locally, not re-sent
    daemon = world.start()
    status = world.wait_idle(daemon)
    assert status["last_scan"]["trigger"] == "startup"
    assert world.proxy.requests == []
    # The journal (what /status reads) is written before the log line: wait for the line, not for time.
    wait_until(lambda: daemon.events("upload_unchanged"), timeout=10, message=daemon.output)
    assert [e["path"] for e in daemon.events("upload_unchanged")] == [first[0]]
    assert daemon.terminate() == 0

    second = [world.remember(f"day2/img_{i:03d}.png", payload(rng)) for i in range(5)]
    for rel in second:
        write_at_once(world.path(rel), world.written[rel])
    daemon = world.start()
    world.wait_in_bucket(second, daemon)
    world.wait_idle(daemon)
    assert sorted(r.key or "" for r in world.proxy.requests) == sorted(world.expected(second))
    assert all(r.operation == "PutObject" and r.status == 200 for r in world.proxy.requests)
    assert world.bucket_diff(world.expected()) == []


@pytest.mark.slow
def test_kill_9_during_a_burst_then_restart_loses_and_corrupts_nothing(world: World) -> None:
    """SIGKILL in the middle of a burst (uploads in flight, files half-written), restart: all there, intact."""
    world.proxy.delay(0.03, when=lambda r: r.operation == "PutObject")  # keep uploads in flight
    daemon = world.start()
    done: list[str] = []
    writer = threading.Thread(
        target=lambda: done.extend(write_burst(world, "k/", folders=40, renamed=40, chunked=40, seed=3))
    )
    writer.start()
    wait_until(lambda: len(world.proxy.puts()) >= 10, timeout=30, message=daemon.output)
    assert daemon.kill() == -signal.SIGKILL
    writer.join(timeout=30)
    assert len(done) == 120
    at_kill = states(world.journal())
    assert at_kill["uploaded"] < 120, "the kill came after the burst was already uploaded"
    assert at_kill["uploading"] >= 1, "no upload was in flight when the daemon died"

    world.proxy.delay(0)
    daemon = world.start()
    world.wait_in_bucket(done, daemon)
    world.wait_idle(daemon)
    expected = world.expected()
    assert world.bucket_diff(expected) == []  # all present, byte-identical, no variant from our own retry
    assert world.complete_puts_only(expected) == []
    accepted = Counter(key for key, reqs in world.puts_by_key().items() for r in reqs if r.ok)
    assert accepted == dict.fromkeys(expected, 1)  # a PUT cut by the kill is refused (BadDigest), never stored
    assert states(world.journal()) == {"uploaded": 120}


def test_store_outage_keeps_files_pending_and_uploads_them_when_it_returns(world: World) -> None:
    """With S3 unreachable files wait in the journal as pending -- claimed once, paused, no attempt counted,
    no further claims while the probe gets no answer; once it is back they upload, no restart."""
    daemon = world.start(retry_base_s=0.1, retry_cap_s=0.4)
    rng = random.Random(4)
    warm = world.remember("warm.png", payload(rng))
    write_at_once(world.path(warm), world.written[warm])
    world.wait_in_bucket([warm], daemon)
    world.wait_idle(daemon)

    world.proxy.down()
    during = [world.remember(f"outage/img_{i:03d}.png", payload(rng)) for i in range(20)]
    for rel in during:
        write_at_once(world.path(rel), world.written[rel])

    def paused() -> bool:
        rows = world.journal()
        known = [rows[rel] for rel in during if rel in rows]
        tried = [row for row in known if row.last_error]
        return len(known) == 20 and len(tried) >= 1 and all(row.state == "pending" for row in known)

    wait_until(paused, timeout=20, message=daemon.output)
    def probes() -> float:  # refused connections never reach the proxy: count them at the daemon
        found = re.search(r'sidecar_s3_requests_total\{operation="HeadBucket",status="error"\} (\S+)',
                          world.metrics(daemon))
        return float(found.group(1)) if found else 0.0

    probes_before = probes()
    wait_until(lambda: probes() >= probes_before + 2, timeout=10, message=daemon.output)  # about once a second
    rows = world.journal()
    assert {rows[rel].state for rel in during} == {"pending"}
    assert {rows[rel].error_class for rel in during if rows[rel].last_error} == {"ConnectionError"}
    assert {rows[rel].attempts for rel in during} == {0}
    assert [e["level"] for e in daemon.events("store_unavailable")] == ["error"]
    assert world.bucket_keys() == {world.key(warm)}

    world.proxy.up()
    world.wait_in_bucket(during, daemon)
    world.wait_idle(daemon)
    assert daemon.is_running()
    assert daemon.events("store_recovered")
    assert world.bucket_diff(world.expected()) == []
    assert {key: len(reqs) for key, reqs in world.puts_by_key().items()} == dict.fromkeys(world.expected(), 1)
    assert states(world.journal()) == {"uploaded": 21}


def test_reused_name_with_new_content_keeps_both_versions(world: World) -> None:
    """Delete a file and write the same name with other bytes: the old object stays, the new goes to a variant."""
    daemon = world.start()
    rel, first, second = "ComfyUI_00001_.png", os.urandom(3_000), os.urandom(4_000)
    write_at_once(world.path(rel), first)
    world.wait_in_bucket([rel], daemon)
    world.wait_idle(daemon)

    world.path(rel).unlink()
    write_at_once(world.path(rel), second)
    variant = f"{POD_ID}/ComfyUI_00001_.{hashlib.md5(second).hexdigest()[:12]}.png"
    wait_until(lambda: variant in world.bucket_keys(), timeout=20, message=daemon.output)
    world.wait_idle(daemon)

    assert world.bucket_diff({world.key(rel): first, variant: second}) == []
    events = daemon.events("key_taken_stored_as_variant")
    assert [(e["key"], e["taken_key"]) for e in events] == [(variant, world.key(rel))]
    assert Counter(r.operation for r in world.proxy.requests) == {"PutObject": 2}
    assert world.journal()[rel].key == variant


def test_reused_name_after_journal_loss_keeps_both_versions(world: World) -> None:
    """With the journal gone, a taken key (412) is resolved by one HEAD: same bytes done, other bytes a variant."""
    daemon = world.start()
    rng = random.Random(5)
    same, changed = "same.png", "changed.png"
    for rel in (same, changed):
        write_at_once(world.path(world.remember(rel, payload(rng))), world.written[rel])
    world.wait_in_bucket([same, changed], daemon)
    world.wait_idle(daemon)
    assert daemon.terminate() == 0
    old = world.written[changed]

    shutil.rmtree(world.state)  # the container disk was wiped; the bucket was not
    world.remember(changed, payload(rng))
    write_at_once(world.path(changed), world.written[changed])
    world.proxy.clear()
    daemon = world.start()
    variant = f"{POD_ID}/changed.{hashlib.md5(world.written[changed]).hexdigest()[:12]}.png"
    wait_until(lambda: variant in world.bucket_keys(), timeout=20, message=daemon.output)
    world.wait_idle(daemon)

    expected = {world.key(same): world.written[same], world.key(changed): old, variant: world.written[changed]}
    assert world.bucket_diff(expected) == []
    assert [e["taken_key"] for e in daemon.events("key_taken_stored_as_variant")] == [world.key(changed)]
    calls = sorted((r.key or "", r.operation, r.status) for r in world.proxy.requests)
    assert calls == sorted([
        (world.key(same), "PutObject", 412), (world.key(same), "HeadObject", 200),
        (world.key(changed), "PutObject", 412), (world.key(changed), "HeadObject", 200),
        (variant, "PutObject", 200),
    ])


def test_sigterm_during_uploads_exits_0_within_the_drain_budget_and_resumes(world: World) -> None:
    """SIGTERM with uploads stuck in flight: exit 0 within drain + 1 s; the rest uploads after a restart."""
    drain = 1.0
    world.proxy.delay(6.0, when=lambda r: r.operation == "PutObject")  # the store answers too slowly to drain
    daemon = world.start(drain_timeout_s=drain, workers=2)
    rng = random.Random(6)
    rels = [world.remember(f"img_{i:03d}.png", payload(rng)) for i in range(8)]
    for rel in rels:
        write_at_once(world.path(rel), world.written[rel])

    def in_flight() -> bool:
        rows = world.journal()
        return len(rows) == 8 and states(rows)["uploading"] == 2

    wait_until(in_flight, timeout=20, message=daemon.output)
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=drain + 5) == 0
    elapsed = time.monotonic() - started
    assert elapsed <= drain + 1.0, f"exited {elapsed:.2f}s after SIGTERM (budget {drain}s + 1s)"
    assert [e["drained"] for e in daemon.events("shutdown_completed")] == [False]
    assert states(world.journal()) == {"pending": 8}  # cut uploads back in the queue; nothing failed or dropped

    world.proxy.delay(0)
    daemon = world.start()
    world.wait_in_bucket(rels, daemon)
    world.wait_idle(daemon)
    assert world.bucket_diff(world.expected()) == []
    assert states(world.journal()) == {"uploaded": 8}


def test_second_signal_exits_at_once_and_loses_nothing(world: World) -> None:
    """A second SIGTERM during the drain exits 130 at once; the files upload after a restart."""
    world.proxy.delay(6.0, when=lambda r: r.operation == "PutObject")
    daemon = world.start(drain_timeout_s=4)
    rng = random.Random(7)
    rels = [world.remember(f"img_{i:03d}.png", payload(rng)) for i in range(3)]
    for rel in rels:
        write_at_once(world.path(rel), world.written[rel])
    wait_until(lambda: states(world.journal())["uploading"] >= 1, timeout=20, message=daemon.output)

    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    wait_until(lambda: daemon.events("shutdown_started"), timeout=5, message=daemon.output)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=5) == 130
    assert time.monotonic() - started < 2.0

    world.proxy.delay(0)
    daemon = world.start()
    world.wait_in_bucket(rels, daemon)
    world.wait_idle(daemon)
    assert world.bucket_diff(world.expected()) == []


def test_key_over_1024_bytes_is_parked_without_a_request(world: World) -> None:
    """A path whose key exceeds 1,024 bytes is parked as failed (InvalidObjectName), never sent; others upload."""
    daemon = world.start()
    rng = random.Random(8)
    deep = "/".join(f"{n}-" + "d" * 200 for n in range(5))  # five folders of 202 bytes: key > 1,024 bytes
    long_rel = f"{deep}/ComfyUI_00001_.png"
    assert len(world.key(long_rel).encode()) > 1024
    write_at_once(world.path(long_rel), payload(rng))
    normal = [world.remember(f"ok/img_{i}.png", payload(rng)) for i in range(3)]
    for rel in normal:
        write_at_once(world.path(rel), world.written[rel])

    wait_until(lambda: long_rel in world.journal() and world.journal()[long_rel].state == "failed",
               timeout=20, message=daemon.output)
    world.wait_in_bucket(normal, daemon)
    world.wait_idle(daemon)

    row = world.journal()[long_rel]
    assert row.error_class == "InvalidObjectName"
    assert "1024-byte limit" in (row.last_error or "")
    assert [e["error_class"] for e in daemon.events("upload_failed")] == ["InvalidObjectName"]
    assert not [r for r in world.proxy.requests if (r.key or "").startswith(f"{POD_ID}/0-d")]
    assert world.bucket_diff(world.expected(normal)) == []
    assert daemon.is_running()
