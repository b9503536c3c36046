"""Hostile inputs in the watched tree: odd names, special files, unreadable files, files that vanish, links
that point out of the root, folders renamed under pending uploads, a sparse file of many GB and thousands of
files in one folder. Each gets a clear outcome (uploaded, skipped with a reason, or parked with an error) and
none stops the daemon or the other uploads. Nothing outside the watched root is ever read or uploaded."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faults import (
    Rig,
    accepted_puts,
    metric,
    scrape,
    states,
    status,
    userns_available,
)
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.scenarios import sparse_upload
from support.waiting import wait_until

from sidecar.errors import SourceFileError
from sidecar.localfile import open_regular

SPARSE_GIB = float(os.environ.get("SIDECAR_SPARSE_GIB", "1"))  # tens of GB: test_soak.py
MANY_FILES = int(os.environ.get("SIDECAR_MANY_FILES", "2000"))


@pytest.fixture
def rig(tmp_path: Path, s3_server: S3Server, r2_proxy: R2Proxy, bucket: str) -> Iterator[Rig]:
    """A watched folder, a state folder and a bucket behind the strict https proxy; daemons stopped after."""
    r = Rig(tmp_path, s3_server, bucket, proxy=r2_proxy)
    yield r
    r.close()


def payload(rng: random.Random, low: int = 200, high: int = 6_000) -> bytes:
    return rng.randbytes(rng.randint(low, high))


def skipped(samples: dict, reason: str) -> float:  # type: ignore[type-arg]
    return metric(samples, "sidecar_files_skipped_total", reason=reason)


def hold_the_queue(rig: Rig) -> None:
    """With one worker busy on a PUT the proxy holds, files written now wait in the journal as pending, not yet
    opened, until :func:`release_the_queue`. (A file already opened is uploaded as it was read.)"""
    assert rig.proxy is not None
    rig.proxy.delay(60, when=lambda r: r.operation == "PutObject")
    blocker = rig.write("blocker.png", b"holds the only worker")
    wait_until(lambda: blocker in rig.journal() and rig.journal()[blocker].state == "uploading", timeout=20,
               message=rig.output)


def release_the_queue(rig: Rig) -> None:
    assert rig.proxy is not None
    rig.proxy.delay(0)


# -- names ----------------------------------------------------------------------------------------------------------


HOSTILE_NAMES = [
    "empty.png",  # zero bytes
    "with space/a  b c .png",
    "100%/50% done %20 %2F.png",
    "%date:yyyy-MM-dd%/ComfyUI_00001_.png",
    "time 12:30:45/img:1.png",
    "🎨 art/✨ sparkle 🚀.webp",
    "naïve café/Ünïcödé ß.png",
    "what?/#hash&a+b=c;d,e@f$g!.png",
    "quotes/it's \"quoted\" `tick`.png",
    "back\\slash/a\\b.png",
    "tab\tand\nnewline/x\ty\n.png",
    os.fsdecode(b"latin1-\xe9t\xe9/\xff\xfe bytes.png"),  # not UTF-8: key gets %E9 %FF %FE
    "/".join(f"d{n:02d}" for n in range(100)) + "/deep.png",  # 100 folders deep, key ~420 bytes
]


def test_hostile_names_arrive_byte_identical_under_predictable_keys(rig: Rig) -> None:
    """Zero bytes, spaces, %, :, emoji, URL and shell metacharacters, control characters, bytes that are not
    UTF-8 and 100 folders of nesting: every file arrives byte-identical under its documented key."""
    daemon = rig.start()
    rng = random.Random(51)
    for rel in HOSTILE_NAMES:
        rig.write(rel, b"" if rel == "empty.png" else payload(rng))
    rig.wait_in_bucket(HOSTILE_NAMES)
    rig.wait_idle(daemon)

    assert rig.objects() == rig.expected()
    assert rig.key(HOSTILE_NAMES[-2]) == "pod-f/latin1-%E9t%E9/%FF%FE bytes.png"
    assert rig.key(HOSTILE_NAMES[-3]) == "pod-f/tab%09and%0Anewline/x%09y%0A.png"
    assert rig.objects()[rig.key("empty.png")] == b""
    assert states(rig.journal()) == {"uploaded": len(HOSTILE_NAMES)}
    assert rig.proxy is not None
    assert accepted_puts(rig.proxy) == Counter(set(rig.expected()))
    tally = rig.audit("Hostile names (zero bytes, %, :, emoji, metacharacters, control chars, non-UTF-8, "
                      "100 levels deep)")
    assert tally.errors_reported == 0 and tally.duplicate_puts == 0


def test_key_over_1024_bytes_is_parked_with_an_error_and_others_flow(rig: Rig) -> None:
    """A path whose key would exceed 1,024 bytes is parked as failed before any request; the rest uploads."""
    daemon = rig.start()
    rng = random.Random(52)
    long_rel = "/".join(f"{n}-" + "é" * 120 for n in range(5)) + "/ComfyUI_00001_.png"  # 1,200+ UTF-8 bytes
    rig.write(long_rel, payload(rng))
    rig.forget(long_rel)
    normal = [rig.write(f"ok/img_{i}.png", payload(rng)) for i in range(5)]
    wait_until(lambda: rig.journal().get(long_rel) and rig.journal()[long_rel].state == "failed",  # type: ignore[return-value]
               timeout=20, message=rig.output)
    rig.wait_in_bucket(normal)
    rig.wait_idle(daemon)
    row = rig.journal()[long_rel]
    assert row.error_class == "InvalidObjectName"
    assert [e["error_class"] for e in daemon.events("upload_failed")] == ["InvalidObjectName"]
    assert metric(scrape(daemon), "sidecar_queue_files", state="failed") == 1
    assert rig.proxy is not None and all(len((r.key or "").encode()) <= 1024 for r in rig.proxy.requests)
    tally = rig.audit("Key over 1,024 bytes: parked as failed (InvalidObjectName), never sent", parked=1)
    assert tally.errors_reported >= 1


# -- special and unreadable files ---------------------------------------------------------------------------------


def test_fifos_sockets_and_devices_are_skipped_without_blocking(rig: Rig) -> None:
    """A FIFO (even one with a writer), a socket and character devices named like images are skipped as
    not_regular; nothing blocks and the files around them upload."""
    daemon = rig.start()
    rng = random.Random(53)
    special = rig.out / "special"
    special.mkdir()
    os.mkfifo(special / "fifo.png")
    os.mkfifo(special / "held-fifo.mp4")
    holder = os.open(special / "held-fifo.mp4", os.O_RDWR)  # a FIFO with a writer: a blocking read would hang
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(special / "socket.png"))
    devices = 0
    for name, minor in (("zero.png", 5), ("null.webp", 3), ("urandom.mp4", 9)):
        try:
            os.mknod(special / name, 0o600 | stat.S_IFCHR, os.makedev(1, minor))
            devices += 1
        except PermissionError:
            pass  # no CAP_MKNOD here: documented in RELIABILITY.md
    try:
        normal = [rig.write(f"special/img_{i}.png", payload(rng)) for i in range(5)]
        rig.wait_in_bucket(normal)
        wait_until(lambda: skipped(scrape(daemon), "not_regular") >= 3 + devices, timeout=20, message=rig.output)
        rig.wait_idle(daemon)
    finally:
        os.close(holder)
        sock.close()
    assert daemon.is_running()
    assert rig.objects() == rig.expected()
    assert not [e for e in daemon.events("upload_failed")]
    logged = {e["path"] for e in daemon.events("candidate_skipped") if e["reason"] == "not_regular"}
    assert {"special/fifo.png", "special/held-fifo.mp4", "special/socket.png"} <= logged
    tally = rig.audit(f"FIFOs (one held open), a socket, {devices} character devices: skipped as not_regular",
                      devices=devices)
    assert tally.duplicate_puts == 0


needs_userns = pytest.mark.skipif(not userns_available(), reason="unshare -U is not permitted here")


@needs_userns
def test_unreadable_files_and_folders_are_skipped_loudly_and_picked_up_once_readable(rig: Rig) -> None:
    """Mode 000 files and 0700 folders of another owner are skipped with a reason, logged, retried by every
    scan and uploaded once readable. (As root mode 000 is readable, so the daemon runs as a mapped user.)"""
    rng = random.Random(54)
    private = rig.out / "private"
    private.mkdir()
    locked = [rig.write(f"locked_{i}.png", payload(rng)) for i in range(2)]
    hidden = rig.write("private/inside.png", payload(rng))
    for rel in locked:
        rig.path(rel).chmod(0o000)
    private.chmod(0o000)
    # In a user namespace where we are not root, our files are owned by "us" but no capability overrides
    # their mode bits, exactly like a non-root sidecar next to files of a stricter writer.
    daemon = rig.start(prefix=["unshare", "-U", "--map-user=1000", "--map-group=1000"], scan_interval_s=1)
    readable = [rig.write(f"open/img_{i}.png", payload(rng)) for i in range(4)]
    rig.wait_in_bucket(readable)
    wait_until(lambda: skipped(scrape(daemon), "unreadable") >= 2 and daemon.events("scan_folder_unreadable"),
               timeout=20, message=rig.output)
    assert daemon.is_running()
    assert rig.keys().isdisjoint({rig.key(rel) for rel in [*locked, hidden]})
    assert {e["path"] for e in daemon.events("candidate_skipped") if e["reason"] == "unreadable"} == set(locked)

    for rel in locked:
        rig.path(rel).chmod(0o644)
    private.chmod(0o755)
    rig.wait_in_bucket([*locked, hidden], timeout=20)  # the periodic scan offers them again
    rig.wait_idle(daemon)
    assert rig.objects() == rig.expected()
    tally = rig.audit("Unreadable files (mode 000) and folder (0000): skipped, logged, uploaded once readable",
                      unreadable_skips=skipped(scrape(daemon), "unreadable"))
    assert tally.errors_reported >= 1


# -- files that vanish, folders that move ------------------------------------------------------------------------------


def test_files_deleted_between_event_and_upload_are_skipped_as_vanished(rig: Rig) -> None:
    """Files deleted before they settle, or after they were queued but before their upload: skipped as
    vanished (a journal row with the reason where one existed); the others upload."""
    daemon = rig.start(workers=1)
    rng = random.Random(55)
    for i in range(20):  # gone before the settle check: Pillow deletes a file whose encoding failed
        path = rig.out / f"flash/img_{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(payload(rng))
        path.unlink()
    hold_the_queue(rig)
    doomed = [rig.write(f"queued/doomed_{i}.png", payload(rng)) for i in range(5)]
    kept = [rig.write(f"queued/kept_{i}.png", payload(rng)) for i in range(5)]
    wait_until(lambda: set(doomed + kept) <= set(rig.journal()), timeout=20, message=rig.output)
    for rel in doomed:
        rig.path(rel).unlink()
        rig.forget(rel)
    release_the_queue(rig)
    rig.wait_in_bucket(kept)
    rig.wait_idle(daemon)

    rows = rig.journal()
    assert {rel: (rows[rel].state, rows[rel].error_class) for rel in doomed} == dict.fromkeys(
        doomed, ("skipped", "vanished"))
    assert sorted(e["path"] for e in daemon.events("upload_skipped")) == sorted(doomed)
    samples = scrape(daemon)
    assert skipped(samples, "vanished") >= 5
    assert daemon.is_running() and rig.objects() == rig.expected()
    tally = rig.audit("Files deleted before settling (20) or after queueing (5): skipped as vanished",
                      vanished=skipped(samples, "vanished"))
    assert tally.errors_reported >= 5


def test_folder_renamed_while_its_files_are_pending_uploads_them_under_the_new_name(rig: Rig) -> None:
    """A folder renamed while its files wait in the queue: old paths are skipped as vanished, the new ones
    are found by the folder scan and uploaded; nothing is lost or uploaded twice."""
    daemon = rig.start(workers=1)
    rng = random.Random(56)
    hold_the_queue(rig)
    rels = [rig.write(f"batch/img_{i:02d}.png", payload(rng)) for i in range(10)]
    wait_until(lambda: set(rels) <= set(rig.journal()), timeout=20, message=rig.output)
    os.rename(rig.out / "batch", rig.out / "batch-renamed")
    for rel in rels:
        rig.remember(rel.replace("batch/", "batch-renamed/"), rig.versions.pop(rel)[-1])
    release_the_queue(rig)
    rig.wait_in_bucket(list(rig.versions))
    rig.wait_idle(daemon)

    rows = rig.journal()
    assert {rows[rel].state for rel in rels} == {"skipped"}
    assert {rows[rel].state for rel in rig.versions} == {"uploaded"}
    assert rig.objects() == rig.expected()
    tally = rig.audit("Folder renamed while its 10 files were pending")
    assert tally.duplicate_puts == 0


# -- links: nothing outside the root -----------------------------------------------------------------------------------


def test_symlinks_out_of_the_root_and_link_loops_are_never_followed(rig: Rig, tmp_path: Path) -> None:
    """Links to /etc/passwd, to a folder outside, to each other, to themselves and to a parent, and a link to
    a file inside: all skipped, none read; the daemon keeps working and uploads only real files."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"SECRET outside the root " + os.urandom(16)
    (outside / "secret.png").write_bytes(secret)
    daemon = rig.start()
    rng = random.Random(57)
    real = rig.write("links/real.png", payload(rng))
    links = rig.out / "links"
    (links / "passwd.png").symlink_to("/etc/passwd")
    (links / "secret.png").symlink_to(outside / "secret.png")
    (links / "outside-dir").symlink_to(outside)
    (links / "self.png").symlink_to("self.png")
    (links / "a.png").symlink_to("b.png")
    (links / "b.png").symlink_to("a.png")
    (links / "up").symlink_to("..")
    (links / "inside.png").symlink_to("real.png")
    (links / "dangling.png").symlink_to("nowhere.png")
    after = [rig.write(f"links/after_{i}.png", payload(rng)) for i in range(3)]
    rig.wait_in_bucket([real, *after])
    wait_until(lambda: skipped(scrape(daemon), "symlink") >= 7, timeout=20, message=rig.output)
    rig.wait_idle(daemon)

    assert rig.objects() == rig.expected()
    logged = {e["path"] for e in daemon.events("candidate_skipped") if e["reason"] == "symlink"}
    assert {"links/passwd.png", "links/secret.png", "links/self.png", "links/inside.png"} <= logged
    passwd = Path("/etc/passwd").read_bytes()
    assert rig.proxy is not None
    sent_md5 = {r.headers.get("content-md5") for r in rig.proxy.requests}
    for forbidden in (passwd, secret):
        assert forbidden not in rig.objects().values()
        assert hashlib.md5(forbidden).digest() not in {__import__("base64").b64decode(m) for m in sent_md5 if m}
    tally = rig.audit("Symlinks (to /etc/passwd, outside files and folders, loops, dangling, inside)",
                      symlink_skips=skipped(scrape(daemon), "symlink"))
    assert tally.torn_or_foreign == 0


def test_folder_swapped_for_a_link_out_of_the_root_before_upload_is_refused(rig: Rig, tmp_path: Path) -> None:
    """A queued file whose folder is replaced by a link to an outside folder holding the same name: the
    upload is refused as outside_root and the outside bytes never leave; the moved folder still uploads."""
    assert rig.proxy is not None
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = b"SECRET elsewhere " + os.urandom(16)
    (outside / "x.png").write_bytes(secret)
    daemon = rig.start(workers=1)
    hold_the_queue(rig)
    rel = rig.write("swap/x.png", b"the real x " + os.urandom(64))
    wait_until(lambda: rel in rig.journal(), timeout=20, message=rig.output)
    os.rename(rig.out / "swap", rig.out / "swap.real")
    (rig.out / "swap").symlink_to(outside)
    rig.remember("swap.real/x.png", rig.versions.pop(rel)[-1])
    release_the_queue(rig)
    rig.wait_in_bucket(["swap.real/x.png"])
    wait_until(lambda: rig.journal()[rel].state == "skipped", timeout=20, message=rig.output)
    rig.wait_idle(daemon)

    assert rig.journal()[rel].error_class == "outside_root"
    assert secret not in rig.objects().values()
    assert rig.objects() == rig.expected()
    rig.audit("Folder swapped for a link out of the root while its file was queued", refused=1)


def test_open_regular_never_follows_a_folder_swapped_for_a_link_mid_open(tmp_path: Path) -> None:
    """Unit race: a folder flips between a real folder and a link to an outside one while files are opened
    through it 2 s long: never once is the outside file opened, and every failure is a bounded reason."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "x.png").write_bytes(b"inside")
    (outside / "x.png").write_bytes(b"SECRET")
    stop = threading.Event()

    def flip() -> None:
        d, real, link = root / "d", root / "d.real", root / "d.link"
        os.rename(d, real)
        link.symlink_to(outside)
        while not stop.is_set():
            os.rename(link, d)
            os.rename(d, link)
            os.rename(real, d)
            os.rename(d, real)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            try:
                fd, _ = open_regular(root, b"d/x.png")
            except SourceFileError as exc:
                outcomes[exc.reason] += 1
                continue
            with os.fdopen(fd, "rb") as f:
                outcomes["inside" if f.read() == b"inside" else "LEAKED"] += 1
    finally:
        stop.set()
        flipper.join(timeout=5)
    assert outcomes["LEAKED"] == 0, outcomes
    assert outcomes["inside"] > 0 and set(outcomes) <= {"inside", "vanished", "outside_root"}, outcomes


# -- size and count ----------------------------------------------------------------------------------------------------


def test_sparse_multi_gb_file_uploads_in_valid_parts_with_bounded_memory(tmp_path: Path, s3_server: S3Server) -> None:
    """A sparse file of SIDECAR_SPARSE_GIB (1) GiB reaches the sink byte-exact in equal parts; peak RSS < 256 MiB."""
    sparse_upload(tmp_path, s3_server, SPARSE_GIB, 16, f"Sparse file of {SPARSE_GIB:g} GiB to the sink")


def test_thousands_of_files_in_one_folder_arrive_once_each(tmp_path: Path, s3_server: S3Server, bucket: str) -> None:
    """SIDECAR_MANY_FILES (2,000) files land in one folder at once: every one arrives once, byte-identical.
    (Straight to moto: the proxy's TLS in Python would be the bottleneck; the daemon's metrics count PUTs.)"""
    rig = Rig(tmp_path, s3_server, bucket)
    try:
        daemon = rig.start(workers=8)
        rng = random.Random(59)
        rels = [rig.write(f"flat/ComfyUI_{i:05d}_.png", payload(rng, 100, 400)) for i in range(MANY_FILES)]
        wait_until(lambda: status(daemon)["counts"]["uploaded"]["files"] == len(rels), timeout=60 + MANY_FILES / 20,
                   interval=0.2, message=rig.output)  # /status is cheaper to poll than a LIST of thousands
        rig.wait_idle(daemon, timeout=60)
        assert states(rig.journal()) == {"uploaded": MANY_FILES}
        samples = scrape(daemon)
        requests = {op: metric(samples, "sidecar_s3_requests_total", operation=op)
                    for op in ("PutObject", "HeadObject", "ListObjectsV2")}
        assert requests == {"PutObject": MANY_FILES, "HeadObject": 0, "ListObjectsV2": 0}
        tally = rig.audit(f"{MANY_FILES} files in one folder at once", put_requests=requests["PutObject"])
        assert tally.errors_reported == 0
    finally:
        rig.close()


# -- security -----------------------------------------------------------------------------------------------------


def test_state_dir_and_journal_are_private_even_under_umask_000(rig: Rig) -> None:
    """Started with umask 000: the state folder (and missing parents) is created 0700, the journal and its
    WAL/shm files 0600, the canary 0600; a state folder that already exists keeps its mode, the journal is 0600."""
    rig.env["SIDECAR_STATE_DIR"] = str(rig.base / "state" / "nested")
    daemon = rig.start(umask=0)
    rel = rig.write("img.png", b"some bytes")
    rig.wait_in_bucket([rel])
    rig.wait_idle(daemon)
    state = rig.base / "state" / "nested"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [state.parent, state, *state.iterdir()]}
    assert modes == {"state": 0o700, "nested": 0o700, "journal.sqlite3": 0o600, "journal.sqlite3-wal": 0o600,
                     "journal.sqlite3-shm": 0o600, "sidecar.lock": 0o600}, {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE((rig.out / ".sidecar-canary").stat().st_mode) == 0o600
    assert daemon.terminate() == 0

    shared = rig.base / "shared-state"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    daemon = rig.start(umask=0, state_dir=shared)
    rig.wait_idle(daemon)
    assert stat.S_IMODE((shared / "journal.sqlite3").stat().st_mode) == 0o600
    rig.audit("Private state: 0700 folder, 0600 journal/WAL/shm/canary under umask 000",
              modes={k: oct(v) for k, v in modes.items()})
