"""Retention end to end: a running daemon frees a small disk while the store is up, deletes nothing unverified
while it is down, survives kill -9 mid-prune, keeps both versions of a reused name, and `sidecar prune`.

Every deletion is audited against the bucket: a file that is gone from disk must be in the bucket with
exactly the bytes that were written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import DaemonProcess
from support.e2e import World
from support.waiting import wait_until

from sidecar.keys import KeyBuilder

pytestmark = pytest.mark.slow
KIB = 1024


@pytest.fixture
def small_disk(world: World) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted on the watched folder."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "sidecar-retention", str(world.out)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield world.out
    finally:
        world.close()
        subprocess.run(["umount", "-l", str(world.out)], check=False)


def audit(world: World) -> list[str]:
    """Problems: a written file that is neither on disk with its bytes nor in the bucket with them.

    The disk is looked at first and the bucket after: a file is only deleted once it is stored, so one
    missing from disk at that moment must be in the bucket a moment later."""
    on_disk = {rel: _read(world.path(rel)) for rel in list(world.written)}
    objects = world.objects()
    problems = []
    for rel, local in on_disk.items():
        data = world.written[rel]
        if local is None and objects.get(world.key(rel)) != data:
            problems.append(f"{rel}: deleted but the bucket does not hold its bytes")
        elif local is not None and local != data:
            problems.append(f"{rel}: changed on disk")
    return problems


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def counter(world: World, proc: DaemonProcess, name: str, **labels: str) -> float:
    text = world.metrics(proc)
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{name}{{{re.escape(selector)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def uploaded_then_stopped(world: World, folder: str, count: int, size: int, *, stop: bool = True) -> DaemonProcess:
    """``count`` files of ``size`` bytes in ``folder``, uploaded by a daemon that is then stopped (unless not)."""
    for n in range(count):
        rel = world.remember(f"{folder}/f_{n:03d}.png", os.urandom(size))
        world.path(rel).parent.mkdir(exist_ok=True)
        world.path(rel).write_bytes(world.written[rel])
    proc = world.start()
    world.wait_in_bucket(list(world.written), proc)
    world.wait_idle(proc)
    if stop:
        assert proc.terminate() == 0
    return proc


class Writer:
    """Writes ``count`` files of ``size`` bytes, one every ``every_s``, like ComfyUI; records ENOSPC."""

    def __init__(self, world: World, count: int, size: int, every_s: float, prefix: str = "img") -> None:
        self.world, self.count, self.size, self.every_s, self.prefix = world, count, size, every_s, prefix
        self.enospc: list[str] = []
        self.lowest_free = 1 << 62
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for n in range(self.count):
            rel = f"{self.prefix}/ComfyUI_{n:05d}_.png"
            data = os.urandom(self.size)
            try:
                self.world.path(rel).parent.mkdir(parents=True, exist_ok=True)
                self.world.path(rel).write_bytes(data)
                self.world.remember(rel, data)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                self.enospc.append(rel)
                with_partial = self.world.path(rel)
                if with_partial.exists():
                    with_partial.unlink()  # ComfyUI's save failed: it leaves no finished file
            st = os.statvfs(self.world.out)
            self.lowest_free = min(self.lowest_free, st.f_bavail * st.f_frsize)
            time.sleep(self.every_s)  # the writer's pace, not a wait for a condition


def test_a_small_disk_never_fills_while_the_store_is_up(world: World, small_disk: Path) -> None:
    """60 files of 256 KiB (15 MiB) into 8 MiB with SIDECAR_DISK_MIN_FREE=3MiB: no ENOSPC, every file in
    the bucket byte-identical, deletions counted exactly, oldest first, with their log lines."""
    proc = world.start(disk_min_free="3MiB")
    writer = Writer(world, count=60, size=256 * KIB, every_s=0.2)
    writer.thread.start()
    writer.thread.join(120)
    world.wait_in_bucket(list(world.written), proc, timeout=60)
    assert writer.enospc == [], f"the disk filled: {len(writer.enospc)} writes failed"
    assert audit(world) == []
    assert world.bucket_diff(world.expected()) == []
    gone = sorted(rel for rel in world.written if not world.path(rel).exists())
    assert gone, "the policy never had to delete: the test wrote too little"
    wait_until(lambda: counter(world, proc, "sidecar_retention_deleted_total", reason="disk_free") == len(gone),
               timeout=10, message=proc.output)
    assert counter(world, proc, "sidecar_retention_deleted_bytes_total", reason="disk_free") == len(gone) * 256 * KIB
    assert gone == sorted(world.written)[: len(gone)], "oldest uploads go first"
    lines = proc.events("retention_deleted")
    assert lines and {(e["reason"], e["bytes"]) for e in lines} == {("disk_free", 256 * KIB)}
    assert all(e["key"] == world.key(e["path"]) for e in lines)
    status = world.status(proc)
    assert status["retention"]["enabled"] and status["retention"]["disk_min_free"] == f"{3 * 1024 * KIB} bytes"
    assert status["counts"]["deleted"]["files"] == len(gone)
    print(f"retention: {len(gone)} of 60 deleted, lowest free {writer.lowest_free // KIB} KiB")


def test_nothing_is_deleted_while_the_store_is_down(world: World, small_disk: Path) -> None:
    """With the store down nothing is verified, so nothing is deleted and the disk fills; when it comes
    back, uploads resume and retention frees the disk again."""
    proc = world.start(disk_min_free="3MiB")
    world.proxy.down()
    writer = Writer(world, count=40, size=256 * KIB, every_s=0.02)
    writer.thread.start()
    writer.thread.join(60)
    assert writer.enospc, "the disk should have filled with nothing safely stored"
    assert all(world.path(rel).read_bytes() == data for rel, data in world.written.items()), "nothing deleted"
    assert counter(world, proc, "sidecar_retention_deleted_total", reason="disk_free") == 0
    world.proxy.up()
    world.wait_in_bucket(list(world.written), proc, timeout=90)
    wait_until(lambda: counter(world, proc, "sidecar_retention_deleted_total", reason="disk_free") > 0,
               timeout=30, message=proc.output)
    assert audit(world) == []


def test_a_throttled_store_slows_deletion_but_never_lets_an_unverified_file_go(world: World, small_disk: Path) -> None:
    """The first 40 PUTs answer 503 SlowDown: files wait for their retries, only verified ones are deleted,
    every deleted file is in the bucket with its bytes, and in the end every file is stored."""
    world.proxy.fail_next(40, status=503, code="SlowDown", when=lambda req: req.operation == "PutObject")
    proc = world.start(disk_min_free="3MiB", retry_base_s=0.2, retry_cap_s=1)
    writer = Writer(world, count=40, size=256 * KIB, every_s=0.1)
    writer.thread.start()
    while writer.thread.is_alive():
        assert audit(world) == []  # at every moment, not only at the end
        writer.thread.join(0.5)
    world.wait_in_bucket(list(world.written), proc, timeout=90)
    assert audit(world) == []
    assert world.bucket_diff(world.expected()) == []
    assert sum(1 for r in world.proxy.requests if r.operation == "PutObject" and r.status == 503) == 40


def test_kill_9_during_pruning_loses_nothing(world: World) -> None:
    """40 uploaded files, retention at 5 deletions/s, kill -9 mid-way, restart: every file ends up deleted
    exactly once, nothing is left under a quarantine name, and the bucket holds every file's bytes."""
    uploaded_then_stopped(world, "batch", 40, 8 * KIB)
    proc = world.start(delete_after_s=0, retention_rate=5)
    wait_until(lambda: len(proc.events("retention_deleted")) >= 3, timeout=30, message=proc.output)
    proc.kill()
    proc = world.start(delete_after_s=0, retention_rate=50)
    wait_until(lambda: not any(world.path(rel).exists() for rel in world.written), timeout=30,
               message=proc.output)
    assert list((world.out / "batch").iterdir()) == []  # no .sidecar-deleting-* left behind
    assert world.bucket_diff(world.expected()) == []
    status = world.wait_idle(proc)
    assert status["counts"]["deleted"]["files"] == 40 and status["counts"]["uploaded"]["files"] == 0


def test_a_name_reused_after_deletion_keeps_both_versions(world: World) -> None:
    """ComfyUI reuses `_00001_` once the file is gone: the new bytes go to a variant key, the old object stays."""
    proc = world.start(delete_after_s=0)
    first = b"first image" * 100
    world.path("ComfyUI_00001_.png").write_bytes(first)
    wait_until(lambda: not world.path("ComfyUI_00001_.png").exists(), timeout=20, message=proc.output)
    second = b"second image, same name" * 100
    world.path("ComfyUI_00001_.png").write_bytes(second)
    variant = KeyBuilder.variant(world.key("ComfyUI_00001_.png"), hashlib.md5(second).hexdigest())
    wait_until(lambda: variant in world.bucket_keys(), timeout=20, message=proc.output)
    objects = world.objects()
    assert objects[world.key("ComfyUI_00001_.png")] == first
    assert objects[variant] == second


def test_excluded_paths_are_never_deleted(world: World) -> None:
    proc = world.start(delete_after_s=0, retention_exclude="keep/*")
    for rel in ("keep/model.png", "out/image.png"):
        world.path(rel).parent.mkdir(exist_ok=True)
        world.path(world.remember(rel, os.urandom(1000))).write_bytes(world.written[rel])
    wait_until(lambda: not world.path("out/image.png").exists(), timeout=20, message=proc.output)
    world.wait_idle(proc)
    assert world.path("keep/model.png").read_bytes() == world.written["keep/model.png"]
    assert world.bucket_diff(world.expected()) == []


def test_prune_dry_run_then_prune(world: World) -> None:
    """`sidecar prune --dry-run` lists and deletes nothing; `sidecar prune` deletes down to the limit and
    exits 0; beside a running daemon it exits 2 naming it; without a policy it exits 2."""
    proc = uploaded_then_stopped(world, "p", 10, 10 * KIB, stop=False)
    code, out, err = world.cli("prune", keep_max_bytes="50KiB")
    assert code == 2 and re.fullmatch(r"sidecar: .*\b(PID|pid) \d+.*\n", err), (code, out, err)
    assert proc.terminate() == 0

    code, out, err = world.cli("prune", "--dry-run", keep_max_bytes="50KiB")
    assert code == 0, (out, err)
    assert re.search(r"^would delete 6 file\(s\), 61440 bytes \(keep_max: 6\)", out, flags=re.MULTILINE), out
    assert all(world.path(rel).exists() for rel in world.written)

    code, out, err = world.cli("prune", keep_max_bytes="50KiB")
    assert code == 0, (out, err)
    assert re.search(r"^deleted 6 file\(s\), 61440 bytes \(keep_max: 6\)", out, flags=re.MULTILINE), out
    assert sum(world.path(rel).exists() for rel in world.written) == 4
    assert audit(world) == []

    code, _, err = world.cli("prune")
    assert (code, err.count("\n")) == (2, 1) and "SIDECAR_DELETE_AFTER_S" in err
