"""The settle check, the reconciliation scan and the watcher, on real files and real inotify."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.waiting import wait_until

from sidecar.config import DEFAULT_EXTENSIONS
from sidecar.filters import PathFilter
from sidecar.health import Canary
from sidecar.intake import Intake
from sidecar.journal import Candidate, Journal
from sidecar.metrics import Metrics
from sidecar.mounts import mounts_under
from sidecar.scanner import Scanner
from sidecar.settle import CLOSE_RACE_S, Settler
from sidecar.watcher import Watcher, folders_below, watched_dirs


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Collected:
    def __init__(self) -> None:
        self.ready: list[Candidate] = []
        self.skipped: list[str] = []


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Settler, Clock, Collected, Path]:
    clock, got = Clock(), Collected()
    settler = Settler(tmp_path, settle_s=0.5, on_ready=got.ready.extend, on_skip=got.skipped.append, clock=clock)
    return settler, clock, got, tmp_path


def drain(settler: Settler, clock: Clock, seconds: float, step: float = 0.25) -> None:
    end = clock.now + seconds
    while clock.now < end:
        settler.run_once()
        clock.now += step
    settler.run_once()


def test_file_still_open_for_writing_is_held(setup: tuple[Settler, Clock, Collected, Path]) -> None:
    """A file some process still holds open for writing is never confirmed, however stable it looks."""
    settler, clock, got, root = setup
    with (root / "a.png").open("wb") as f:
        f.write(b"half")
        f.flush()
        settler.offer(b"a.png", "create")
        drain(settler, clock, 10)
        assert got.ready == []
    drain(settler, clock, 3)
    assert [c.path for c in got.ready] == [b"a.png"]
    assert got.ready[0].size == 4


def test_growing_file_waits_until_stable(setup: tuple[Settler, Clock, Collected, Path]) -> None:
    """A file that changed between two checks is re-checked, and confirmed with its final size."""
    settler, clock, got, root = setup
    (root / "a.png").write_bytes(b"x")
    settler.offer(b"a.png", "create")
    settler.run_once()
    (root / "a.png").write_bytes(b"xyz-longer")
    drain(settler, clock, 3)
    assert [(c.path, c.size) for c in got.ready] == [(b"a.png", 10)]


def test_a_close_event_confirms_at_once_without_a_second_look(
    setup: tuple[Settler, Clock, Collected, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's close (no writer left) confirms in the same round, with one open: no settle wait."""
    settler, _clock, got, root = setup
    (root / "a.png").write_bytes(b"done")
    stats: list[str] = []
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: stats.append("lstat") or real_lstat(p, *a, **k))
    settler.offer(b"a.png", "modify")
    settler.offer(b"a.png", "close")
    assert settler.run_once() == 1
    assert [(c.path, c.size, c.source) for c in got.ready] == [(b"a.png", 4, "close")] and len(settler) == 0
    assert stats == []  # not the first-look lstat of the settle path


def test_a_close_event_with_a_writer_left_waits(setup: tuple[Settler, Clock, Collected, Path]) -> None:
    """A close by one writer while another still holds the file (the lease says so) is not enough."""
    settler, clock, got, root = setup
    with (root / "a.png").open("wb") as other:
        other.write(b"part")
        other.flush()
        settler.offer(b"a.png", "close")
        drain(settler, clock, 3)
        assert got.ready == []
    settler.offer(b"a.png", "close")
    settler.run_once()
    assert [c.size for c in got.ready] == [4]


def test_a_writer_still_counted_at_its_close_event_is_looked_at_again_soon(
    setup: tuple[Settler, Clock, Collected, Path],
) -> None:
    """The kernel reports a close just before it drops the writer's count: a lease refused right at the close
    event is asked again within 10 ms, not after the settle backoff (0.5 s here)."""
    settler, clock, got, root = setup
    with (root / "a.png").open("wb") as writer:
        writer.write(b"data")
        writer.flush()
        settler.offer(b"a.png", "close")
        settler.run_once()
        assert got.ready == [] and settler.next_due_in() == pytest.approx(CLOSE_RACE_S)
    clock.now += CLOSE_RACE_S
    settler.run_once()
    assert [(c.path, c.size, c.source) for c in got.ready] == [(b"a.png", 4, "close")]


def test_a_close_arriving_while_the_file_is_being_checked_is_not_lost(
    setup: tuple[Settler, Clock, Collected, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors renames and then closes: the rename's first look and the close event race. A close that
    lands while the check runs makes the file due at once, not after the settle period (0.5 s here)."""
    settler, _clock, got, root = setup
    (root / "a.latent").write_bytes(b"tensor")
    real_lstat = os.lstat

    def lstat_racing_the_close(path: object, *args: object, **kwargs: object) -> os.stat_result:
        result = real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]
        if got.ready == [] and not raced:
            raced.append(True)
            settler.offer(b"a.latent", "modify")  # on the reader thread, in the daemon
            settler.offer(b"a.latent", "close")
        return result

    raced: list[bool] = []
    monkeypatch.setattr(os, "lstat", lstat_racing_the_close)
    settler.offer(b"a.latent", "move")
    assert settler.run_once() == 0 and raced
    assert settler.next_due_in() == 0
    assert settler.run_once() == 1
    assert [(c.path, c.source) for c in got.ready] == [(b"a.latent", "close")]


def test_a_close_event_in_events_mode_confirms_at_once(tmp_path: Path) -> None:
    """Where the lease cannot answer (another user's file), the close event alone confirms, at once."""
    clock, got = Clock(), Collected()
    settler = Settler(tmp_path, settle_s=0.5, on_ready=got.ready.extend, clock=clock, lease=lambda fd: None)
    (tmp_path / "a.png").write_bytes(b"x" * 10)
    settler.offer(b"a.png", "create")
    settler.offer(b"a.png", "modify")
    settler.run_once()
    assert got.ready == []  # still being written: no close yet
    settler.offer(b"a.png", "close")
    settler.run_once()
    assert [c.size for c in got.ready] == [10]


def test_confirmation_needs_the_settle_interval(setup: tuple[Settler, Clock, Collected, Path]) -> None:
    """A renamed-in, untouched file is confirmed after settle_s and not before; offers coalesce."""
    settler, clock, got, root = setup
    (root / "a.png").write_bytes(b"done")
    settler.offer(b"a.png", "move")
    settler.offer(b"a.png", "move")
    settler.run_once()
    clock.now += 0.25
    settler.run_once()
    assert got.ready == []
    clock.now += 0.3
    settler.run_once()
    assert len(got.ready) == 1 and len(settler) == 0


@pytest.mark.parametrize("kind", ["vanished", "fifo", "socket", "symlink", "outside"])
def test_unfit_candidates_are_skipped_with_a_reason(setup: tuple[Settler, Clock, Collected, Path], kind: str) -> None:
    """Vanished files, FIFOs, sockets and links are skipped at once, without blocking."""
    settler, clock, got, root = setup
    name = b"x.png"
    if kind == "fifo":
        os.mkfifo(root / "x.png")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(root / "x.png"))
        sock.close()
    elif kind == "symlink":
        (root / "x.png").symlink_to("/etc/passwd")
    elif kind == "outside":
        (root / "etc").symlink_to("/etc")
        name = b"etc/passwd"
    settler.offer(name, "create")
    drain(settler, clock, 1)
    expected = {"vanished": "vanished", "fifo": "not_regular", "socket": "not_regular", "symlink": "symlink",
                "outside": "outside_root"}[kind]
    assert got.ready == [] and got.skipped == [expected]


def test_scan_offers_only_new_or_changed_files(tmp_path: Path) -> None:
    """The scan compares with the journal: unknown or changed files are offered, known ones are not."""
    root = tmp_path / "out"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ("a.png", "sub/b.webp", "sub/deeper/c.mp4", ".hidden/d.png", "sub/e.safetensors"):
        (root / rel).write_bytes(b"data-" + rel.encode())
    (root / "link.png").symlink_to(root / "a.png")
    journal = Journal(tmp_path / "j.sqlite3")
    st = (root / "a.png").stat()
    journal.record([Candidate(b"a.png", st.st_size, st.st_mtime_ns, "scan", st.st_ino, st.st_ctime_ns)])
    st = (root / "sub/b.webp").stat()
    journal.record([Candidate(b"sub/b.webp", st.st_size + 1, st.st_mtime_ns, "scan", st.st_ino,
                              st.st_ctime_ns)])  # changed since
    offered: list[bytes] = []
    scanner = Scanner(root, journal=journal, path_filter=PathFilter(DEFAULT_EXTENSIONS.split(",")),
                      offer=lambda rel, source: offered.append(rel))
    result = scanner.scan()
    assert sorted(offered) == [b"sub/b.webp", b"sub/deeper/c.mp4"]
    assert result.files == 3 and result.offered == 2
    offered.clear()
    scanner.scan(b"sub/deeper")
    assert offered == [b"sub/deeper/c.mp4"]


def test_scan_applies_every_filter_rule_as_an_event_would(tmp_path: Path) -> None:
    """The walk offers exactly what Intake's filter lets through: hidden folders and names, partial suffixes,
    other extensions, include/exclude globs over the whole path, links and FIFOs all stay out."""
    root = tmp_path / "out"
    for folder in ("keep/deep", "skip", ".cache", "keep/.git"):
        (root / folder).mkdir(parents=True)
    names = ("keep/a.png", "keep/deep/b.png", "keep/.c.png", "keep/d.png.part", "keep/e.txt", "skip/f.png",
             ".cache/g.png", "keep/.git/h.png", "top.png")
    for rel in names:
        (root / rel).write_bytes(rel.encode())
    os.mkfifo(root / "keep" / "fifo.png")
    (root / "keep" / "link.png").symlink_to(root / "top.png")
    (root / "keep" / "dirlink").symlink_to(root / "keep" / "deep")
    path_filter = PathFilter(["png"], include=["keep/*"], exclude=["skip/*"])
    offered: list[bytes] = []
    result = Scanner(root, journal=Journal(tmp_path / "j.sqlite3"), path_filter=path_filter,
                     offer=lambda rel, source: offered.append(rel)).scan()
    assert sorted(offered) == [b"keep/a.png", b"keep/deep/b.png"]
    assert sorted(rel for rel in names if path_filter.skip_reason(rel) is None) == ["keep/a.png", "keep/deep/b.png"]
    assert result.files == 2


class Events:
    def __init__(self) -> None:
        self.paths: dict[bytes, set[str]] = {}
        self.dirs: list[bytes] = []
        self.overflows = 0
        self.lock = threading.Lock()

    def on_path(self, rel: bytes, source: str) -> None:
        with self.lock:
            self.paths.setdefault(rel, set()).add(source)

    def on_dir(self, rel: bytes) -> None:
        with self.lock:
            self.dirs.append(rel)

    def on_overflow(self) -> None:
        self.overflows += 1


def closed_all(events: Events, paths: set[bytes]) -> bool:
    with events.lock:
        return all("close" in events.paths.get(rel, ()) for rel in paths)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Watcher, Events, Path]]:
    events = Events()
    root = tmp_path / "not-yet-there"
    watcher = Watcher(root, on_path=events.on_path, on_dir=events.on_dir, on_overflow=events.on_overflow)
    watcher.start()
    yield watcher, events, root
    watcher.stop()


def test_watcher_creates_root_and_reports_every_kind_of_write(watched: tuple[Watcher, Events, Path]) -> None:
    """Close, rename and writes into a fresh subfolder all reach the handler (FIELD-NOTES §1): files written
    into a new folder before its watch existed are reported as created, the folder itself too (for a scan),
    and what is written once it is watched gets close events."""
    watcher, events, root = watched
    assert watcher.mode == "inotify" and root.is_dir()
    (root / "a.png").write_bytes(b"a")
    (root / "b.png.tmp").write_bytes(b"b")
    os.rename(root / "b.png.tmp", root / "b.png")
    fresh = root / "2026-11-27"
    fresh.mkdir()
    os.mkfifo(fresh / "fifo.png")  # not a file to upload, but a candidate for the settler to turn down loudly
    early = {f"2026-11-27/ComfyUI_{n:05d}_.png".encode() for n in range(5)}
    for rel in early:
        (root / os.fsdecode(rel)).write_bytes(b"x" * 100)
    wait_until(lambda: b"2026-11-27" in events.dirs, timeout=10, message=lambda: f"folders so far: {events.dirs}")
    late = {f"2026-11-27/late_{n}.png".encode() for n in range(3)}
    for rel in late:
        (root / os.fsdecode(rel)).write_bytes(b"y" * 100)
    wait_until(lambda: closed_all(events, {b"a.png", *late}) and early | {b"b.png"} <= events.paths.keys(),
               timeout=10, message=lambda: f"events so far: {events.paths}")
    assert events.paths[b"a.png"] == {"create", "modify", "close"}
    assert events.paths[b"b.png"] == {"move"}, "a rename inside the tree is a move, reported under the new name"
    assert "create" in events.paths[b"2026-11-27/fifo.png"]


def test_watcher_follows_renamed_and_moved_in_folders(watched: tuple[Watcher, Events, Path]) -> None:
    """A folder renamed inside the tree, and one moved in from outside, are reported and watched under their
    new names; a file moved in from outside is a create (no close will come); a nested tree made at once
    is watched to its bottom."""
    _, events, root = watched
    outside = root.parent / "outside"
    (outside / "inner").mkdir(parents=True)
    (outside / "moved-in.png").write_bytes(b"m")
    (root / "old").mkdir()
    wait_until(lambda: b"old" in events.dirs, timeout=10, message=lambda: f"folders so far: {events.dirs}")
    os.rename(root / "old", root / "new")
    os.rename(outside / "inner", root / "came")
    os.rename(outside / "moved-in.png", root / "moved-in.png")
    (root / "deep" / "er" / "est").mkdir(parents=True)
    wait_until(lambda: {b"new", b"came", b"deep"} <= set(events.dirs), timeout=10,
               message=lambda: f"folders so far: {events.dirs}")
    est = (root / "deep" / "er" / "est").stat()  # made after "deep" was watched, or before it was listed
    wait_until(lambda: (est.st_dev, est.st_ino) in (watched_dirs() or set()), timeout=10,
               message="the bottom of a tree made at once is not watched")
    for rel in ("new/n.png", "came/c.png", "deep/er/est/d.png"):
        (root / rel).write_bytes(b"x")
    wanted = {b"new/n.png", b"came/c.png", b"deep/er/est/d.png"}
    wait_until(lambda: closed_all(events, wanted), timeout=10, message=lambda: f"events so far: {events.paths}")
    assert events.paths[b"moved-in.png"] == {"create"}
    assert not [rel for rel in events.paths if rel.startswith(b"old/")], "nothing reported under the old name"


def test_queue_overflow_rewatches_and_is_reported_once(tmp_path: Path) -> None:
    """The kernel's event queue overflows while the handler is stuck: on_overflow is called once, after every
    folder made meanwhile is watched (a real overflow: more events than fs.inotify.max_queued_events)."""
    events, stuck, release = Events(), threading.Event(), threading.Event()

    def on_path(rel: bytes, source: str) -> None:
        if rel == b"first.png" and not stuck.is_set():
            stuck.set()
            release.wait(30)
        events.on_path(rel, source)

    watcher = Watcher(tmp_path, on_path=on_path, on_dir=events.on_dir, on_overflow=events.on_overflow)
    watcher.start()
    try:
        (tmp_path / "first.png").write_bytes(b"1")
        wait_until(stuck.is_set, timeout=10, message="the handler never ran")
        (tmp_path / "made-meanwhile").mkdir()
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        with open(tmp_path / "a.bin", "wb", buffering=0) as a, open(tmp_path / "b.bin", "wb", buffering=0) as b:
            for _ in range(limit // 2 + 100):  # alternating files: the kernel merges only identical neighbours
                a.write(b"a")
                b.write(b"b")
        release.set()
        wait_until(lambda: events.overflows >= 1, timeout=10, message="no overflow reported")
        (tmp_path / "made-meanwhile" / "late.png").write_bytes(b"l")
        wait_until(lambda: b"made-meanwhile/late.png" in events.paths, timeout=10,
                   message="a folder made during the overflow is not watched")
        assert events.overflows == 1
        assert watcher.is_alive()
    finally:
        release.set()
        watcher.stop()


def test_watcher_ends_when_its_root_goes_and_a_restart_recreates_it(watched: tuple[Watcher, Events, Path]) -> None:
    """Deleting the watched root ends the reader (is_alive turns False, so health rebuilds it); a restart
    makes the root again and events flow."""
    watcher, events, root = watched
    shutil.rmtree(root)
    wait_until(lambda: not watcher.is_alive(), timeout=10, message="the watcher still looks alive")
    watcher.restart()
    (root / "again.png").write_bytes(b"a")
    wait_until(lambda: b"again.png" in events.paths, timeout=10, message="no events after the restart")


def test_polling_fallback_still_sees_files(tmp_path: Path) -> None:
    """The polling observer (used when inotify is unavailable) delivers created files too."""
    events = Events()
    watcher = Watcher(tmp_path, on_path=events.on_path, on_dir=events.on_dir, on_overflow=events.on_overflow,
                      force_polling=True)
    watcher.start()
    try:
        assert watcher.mode == "polling"
        (tmp_path / "p.png").write_bytes(b"p")
        wait_until(lambda: b"p.png" in events.paths, timeout=15, message="polling observer saw nothing")
    finally:
        watcher.stop()


def test_failed_handover_keeps_the_candidates(tmp_path: Path) -> None:
    """If the journal cannot take confirmed files (e.g. disk full), they stay held and are offered again."""
    clock, accepted = Clock(), []
    failures = [RuntimeError("database or disk is full")]

    def on_ready(batch: list[Candidate]) -> None:
        if failures:
            raise failures.pop()
        accepted.extend(batch)

    settler = Settler(tmp_path, settle_s=0.5, on_ready=on_ready, clock=clock)
    (tmp_path / "a.png").write_bytes(b"a")
    settler.offer(b"a.png", "close")
    with pytest.raises(RuntimeError):
        settler.run_once()
    assert len(settler) == 1
    drain(settler, clock, 3)
    assert [c.path for c in accepted] == [b"a.png"]


def test_close_event_brings_the_next_check_forward(setup: tuple[Settler, Clock, Collected, Path]) -> None:
    """After a long write, the close event makes the file due at once instead of after the grown backoff."""
    settler, clock, got, root = setup
    f = (root / "a.png").open("wb")
    f.write(b"partial")
    f.flush()
    settler.offer(b"a.png", "create")
    drain(settler, clock, 6)  # the writer holds it: rechecks back off towards MAX_RECHECK_S
    f.write(b"-rest")
    f.close()
    settler.offer(b"a.png", "close")
    assert settler.next_due_in() == 0
    settler.run_once()  # sees the final stat
    clock.now += 0.5
    settler.run_once()
    assert [(c.path, c.size) for c in got.ready] == [(b"a.png", 12)]


def test_scan_pauses_while_the_settler_is_full(tmp_path: Path) -> None:
    """A walk over many new files waits while too many candidates are held, then goes on (bounded memory)."""
    root = tmp_path / "out"
    root.mkdir()
    for n in range(1500):
        (root / f"{n:05d}.png").write_bytes(b"x")
    offered: list[bytes] = []
    released = threading.Event()
    scanner = Scanner(root, journal=Journal(tmp_path / "j.sqlite3"), path_filter=PathFilter(["png"]),
                      offer=lambda rel, source: offered.append(rel),
                      backlog=lambda: 0 if released.is_set() else len(offered), max_backlog=600)
    walker = threading.Thread(target=scanner.scan)
    walker.start()
    wait_until(lambda: len(offered) >= 1000, timeout=10, message="the walk never reached its second batch")
    assert walker.is_alive() and len(offered) == 1000  # paused after the batch that crossed the limit
    released.set()
    walker.join(timeout=10)
    assert not walker.is_alive() and len(offered) == 1500


def test_intake_counts_one_skip_per_file_not_per_event(tmp_path: Path) -> None:
    """Three filtered files, each seen as create, modify and close: files_skipped_total moves by 3, not 9."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    journal = Journal(tmp_path / "j.sqlite3")
    settler = Settler(tmp_path, settle_s=0.05, on_ready=lambda c: None)
    intake = Intake(canary=Canary(tmp_path), path_filter=PathFilter(DEFAULT_EXTENSIONS.split(",")), settler=settler,
                    journal=journal, metrics=metrics, wake=lambda: None, want_dir=lambda rel: None)
    for name in (b"a.txt", b"b.txt", b"c.txt"):
        for source in ("create", "modify", "close"):
            intake.on_path(name, source)
    assert registry.get_sample_value("sidecar_files_skipped_total", {"reason": "extension"}) == 3
    assert len(settler) == 0


def test_mounts_under_reads_escaped_mount_points(tmp_path: Path) -> None:
    """Mount points below the root come back relative, with mountinfo's octal escapes undone; others not."""
    root = tmp_path / "out"
    root.mkdir()
    base = os.fsencode(os.path.realpath(root))
    info = tmp_path / "mountinfo"
    info.write_bytes(b"\n".join([
        b"22 1 0:21 / / rw - ext4 /dev/vda rw",
        b"23 22 0:30 / " + base + b" rw - tmpfs t rw",
        b"24 23 0:31 / " + base + rb"/a\040b rw - tmpfs t rw",
        b"25 23 0:32 / " + base + b"/deep/er rw - tmpfs t rw",
        b"26 22 0:33 / " + base + b"-sibling rw - tmpfs t rw",
    ]))
    assert mounts_under(root, str(info)) == {b"a b", b"deep/er"}
    assert mounts_under(root, str(tmp_path / "missing")) is None


def test_the_coverage_walk_finds_every_folder_without_listing_leaves(tmp_path: Path) -> None:
    """The start-up coverage check's walk (leaf folders judged by their link count) finds exactly the folders
    os.walk finds: nested, hidden and emptied ones; a symlink to a folder is not followed."""
    root = tmp_path / "out"
    for rel in ("a/b/c", "a/b/d", "a/e", ".hidden/f", "g", "emptied/h"):
        (root / rel).mkdir(parents=True)
        (root / rel / "x.png").write_bytes(b"x")
    (root / "emptied" / "h" / "x.png").unlink()
    (root / "emptied" / "h").rmdir()  # the parent's link count drops back to 2
    outside = tmp_path / "elsewhere" / "deep"
    outside.mkdir(parents=True)
    (root / "a" / "link").symlink_to(tmp_path / "elsewhere")
    expected = {os.fsencode(root)} | {
        os.path.join(folder, name)
        for folder, subfolders, _ in os.walk(os.fsencode(root))
        for name in subfolders
        if not os.path.islink(os.path.join(folder, name))
    }
    found = list(folders_below(os.fsencode(root)))
    assert len(found) == len(set(found)) == 10
    assert set(found) == expected
    assert found[0] == os.fsencode(root)
