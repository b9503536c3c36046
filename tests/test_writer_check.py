"""The writer check where the lease cannot answer: events and quiet modes, and the deployed shape.

Unit tests drive the settler on real files with a fake clock and a kernel that cannot answer for the file
(``lease=`` returns None, as it does for files of another user without CAP_LEASE). The end-to-end test runs
the real daemon as ``nobody`` against files root writes in place, as in the image.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.e2e import World, write_in_chunks, write_like_a_video
from support.faults import metric, scrape
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.unprivileged import Runtime, build_runtime, shared_folder

from sidecar.journal import Candidate
from sidecar.settle import CLOSE_TIMEOUT_S, Settler
from sidecar.writercheck import choose, has_cap_lease, lease_works_in

QUIET_S = 3.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, root: Path, mode: str) -> None:
        self.root, self.clock = root, Clock()
        self.ready: list[Candidate] = []
        self.checks: list[str] = []
        self.settler = Settler(root, settle_s=0.1, quiet_s=QUIET_S, mode=mode, lease=lambda fd: None,
                               on_ready=self.ready.extend, on_confirmed=self.checks.append, clock=self.clock)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.settler.run_once()
            self.clock.now += step
        self.settler.run_once()


@pytest.fixture(params=["events", "quiet"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    return Rig(tmp_path, request.param)


def test_events_mode_holds_a_modified_file_until_its_close_event(tmp_path: Path) -> None:
    """A file seen being modified is never confirmed while no close event came, however long it stays still."""
    rig = Rig(tmp_path, "events")
    (tmp_path / "v.mp4").write_bytes(b"first half")
    rig.settler.offer(b"v.mp4", "create")
    rig.settler.offer(b"v.mp4", "modify")
    rig.advance(CLOSE_TIMEOUT_S - 5)
    assert rig.ready == []
    rig.settler.offer(b"v.mp4", "close")
    rig.advance(0.5)
    assert [c.path for c in rig.ready] == [b"v.mp4"]
    assert rig.checks == ["close_event"]


def test_events_mode_close_before_a_new_modify_does_not_count(tmp_path: Path) -> None:
    """A close followed by another modify (the writer reopened the file) needs a new close."""
    rig = Rig(tmp_path, "events")
    (tmp_path / "v.mp4").write_bytes(b"v1")
    for source in ("create", "modify", "close", "modify"):
        rig.settler.offer(b"v.mp4", source)
    rig.advance(10)
    assert rig.ready == []


def test_quiet_period_counts_from_the_last_change_not_the_first_sighting(rig: Rig) -> None:
    """With no writer evidence the file waits quiet_s after its last observed change (not after it was first seen)."""
    path = rig.root / "a.png"
    path.write_bytes(b"x" * 100)
    rig.settler.offer(b"a.png", "scan")
    rig.advance(QUIET_S - 0.5)
    with path.open("ab") as out:  # a writer we got no event from adds its next chunk
        out.write(b"y" * 100)
    changed_at = rig.clock.now
    rig.advance(QUIET_S - 0.5)
    assert rig.ready == [], "confirmed less than quiet_s after the last change"
    rig.advance(1.0)
    assert [c.size for c in rig.ready] == [200]
    assert rig.clock.now - changed_at >= QUIET_S
    assert rig.checks == ["quiet_period"]


def test_quiet_mode_does_not_trust_close_events(tmp_path: Path) -> None:
    """Without inotify (polling) there is no close event to believe: the quiet period decides."""
    rig = Rig(tmp_path, "quiet")
    (tmp_path / "a.png").write_bytes(b"data")
    rig.settler.offer(b"a.png", "close")
    rig.advance(QUIET_S - 0.5)
    assert rig.ready == []
    rig.advance(1.0)
    assert rig.checks == ["quiet_period"]


def test_an_empty_file_without_writer_evidence_waits_longer(rig: Rig) -> None:
    """A zero-byte file may be one whose writer has not begun: it waits four quiet periods."""
    (rig.root / "e.png").write_bytes(b"")
    rig.settler.offer(b"e.png", "create")
    rig.advance(3 * QUIET_S)
    assert rig.ready == []
    rig.advance(QUIET_S + 0.5)
    assert [c.size for c in rig.ready] == [0]


def test_a_modified_file_that_never_closes_goes_on_after_the_timeout(tmp_path: Path) -> None:
    """truncate(2) or mmap writes send no close: after CLOSE_TIMEOUT_S quiet the file is taken, counted apart."""
    rig = Rig(tmp_path, "events")
    (tmp_path / "t.png").write_bytes(b"truncated")
    rig.settler.offer(b"t.png", "modify")
    rig.advance(CLOSE_TIMEOUT_S + 3, step=0.5)
    assert [c.path for c in rig.ready] == [b"t.png"]
    assert rig.checks == ["close_timeout"]


def test_probe_picks_events_without_cap_lease_and_lease_with_it(tmp_path: Path) -> None:
    """The probe names lease only with CAP_LEASE on a filesystem that grants leases; else events or quiet."""
    assert lease_works_in(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probe file is gone again
    found = choose([tmp_path], "inotify")
    assert found.mode == ("lease" if has_cap_lease() else "events")
    assert choose([tmp_path], "polling").mode == ("lease" if has_cap_lease() else "quiet")
    assert choose([tmp_path / "missing"], "inotify").mode == "events"
    assert not choose([tmp_path / "missing"], "inotify").lease_own_files


# -- the deployed shape: the daemon as nobody, the writer as root -----------------------------------------


@pytest.fixture(scope="session")
def runtime() -> Iterator[Runtime]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the writer as root and the daemon as another user")
    base = shared_folder("sidecar-runtime-")
    try:
        yield build_runtime(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_unprivileged_daemon_never_uploads_a_prefix_of_root_owned_files(
    runtime: Runtime, s3_server: S3Server, r2_proxy_http: R2Proxy, bucket: str
) -> None:
    """As nobody beside a root writer: mode events, every PUT the final bytes, one PUT a file, no lease used."""
    base = shared_folder("sidecar-unpriv-")
    world = World(base, s3_server, r2_proxy_http, bucket)
    world.env["PYTHONPATH"] = runtime.pythonpath  # the copied working tree: the repo may be unreadable to nobody
    try:
        os.chown(world.out, runtime.uid, runtime.gid)
        world.state.mkdir()
        os.chown(world.state, runtime.uid, runtime.gid)
        (world.out / "video").mkdir()  # watched before the writes: its files get create/modify/close events
        proc = world.start(python=runtime.python, user=runtime.uid)
        check = proc.events("writer_check")
        assert [(c["mode"], c["uid"], c["cap_lease"]) for c in check] == [("events", runtime.uid, False)]

        rng = random.Random(9)
        jobs: list[tuple[str, bytes, str]] = []
        for i in range(3):  # 2.4 s of writing with a 0.3-0.7 s stop after 2 s: the case that was torn before
            jobs.append((f"video/clip_{i:05d}_.mp4", rng.randbytes(900_000), "video"))
        for i in range(2):  # the same, in a folder created right before the write (no watch yet)
            jobs.append((f"2026-12-01-{i}/clip_{i:05d}_.mp4", rng.randbytes(700_000), "video"))
        for i in range(12):  # PIL-style in-place PNGs, three chunks with the fd held
            jobs.append((f"ComfyUI_{i:05d}_.png", rng.randbytes(rng.randrange(40_000, 300_000)), "png"))

        def write(rel: str, data: bytes, kind: str) -> None:
            world.remember(rel, data)
            if kind == "video":
                write_like_a_video(world.path(rel), data, seconds=2.4, pause_at_s=2.0,
                                   pause_s=rng.uniform(0.3, 0.7))
            else:
                write_in_chunks(world.path(rel), data, chunks=3, pause_s=0.4)

        threads = [threading.Thread(target=write, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(world.path(rel).stat().st_uid == 0 for rel, _, _ in jobs)

        world.wait_in_bucket([rel for rel, _, _ in jobs], proc, timeout=60)
        status = world.wait_idle(proc, timeout=60)
        expected = world.expected()
        assert world.bucket_diff(expected) == []
        assert world.complete_puts_only(expected) == []  # no PUT ever carried a prefix of its file
        assert {key: len(reqs) for key, reqs in world.puts_by_key().items()} == dict.fromkeys(expected, 1)
        assert status["writer_check"]["mode"] == "events"
        samples = scrape(proc)
        assert metric(samples, "sidecar_writer_check_mode", mode="events") == 1
        assert metric(samples, "sidecar_files_confirmed_total", check="lease") == 0
        confirmed = {c: metric(samples, "sidecar_files_confirmed_total", check=c)
                     for c in ("close_event", "quiet_period", "close_timeout")}
        assert confirmed["close_timeout"] == 0
        assert confirmed["close_event"] >= 3 + 12  # every file written under an existing watch
        assert sum(confirmed.values()) == len(jobs)
        print(json.dumps({"files": len(jobs), "puts": len(world.proxy.puts()), "confirmed": confirmed}))
    finally:
        world.close()
        shutil.rmtree(base, ignore_errors=True)
