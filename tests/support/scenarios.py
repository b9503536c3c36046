"""Scenario drivers shared by the fault, hostile-input and soak suites: writers that behave like a busy pod,
the outage-under-a-stream and kill-loop procedures, and the sparse-file upload to the sink. Each ends in an
audit (see :meth:`support.faults.Rig.audit`) and records its figures."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path

from sidecar.transfer import part_size_for

from .faults import (
    MIB,
    Rig,
    S3Sink,
    Tally,
    accepted_puts,
    errors_reported,
    metric,
    peak_rss_kib,
    scrape,
    states,
)
from .proxy import RecordedRequest
from .s3server import S3Server
from .waiting import wait_until


def payload(rng: random.Random, low: int = 500, high: int = 12_000) -> bytes:
    """Small unique content (moto keeps every object in RAM)."""
    return rng.randbytes(rng.randint(low, high))


def is_put(r: RecordedRequest) -> bool:
    return r.operation == "PutObject"


def one_accepted_put_per_file(rig: Rig) -> None:
    assert rig.proxy is not None
    assert accepted_puts(rig.proxy) == Counter(set(rig.expected())), "a key was written more than once (or never)"


class Stream:
    """A writer thread producing one new file every ``every_s`` until stopped, like a pod mid-queue."""

    def __init__(self, rig: Rig, prefix: str, every_s: float, seed: int) -> None:
        self.rig = rig
        self.prefix = prefix
        self.every_s = every_s
        self.rng = random.Random(seed)
        self.written: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            rel = f"{self.prefix}ComfyUI_{n:05d}_.png"
            self.rig.write(rel, payload(self.rng))
            self.written.append(rel)
            n += 1
            self._stop.wait(self.every_s)  # the pace of the producer, not a wait for a condition

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def outage_under_stream(rig: Rig, *, outage_files: int, min_probes: int, scenario: str, every_s: float = 0.04,
                        **settings: str | float) -> Tally:
    """The store goes down under a steady stream of new files until ``outage_files`` were written during the
    outage and the store probe asked at least ``min_probes`` times; then it comes back. The files claimed at
    the cut are paused (no attempt counted), nothing more is claimed, everything waits as pending (visible
    in metrics), then uploads once."""
    assert rig.proxy is not None
    proxy = rig.proxy
    daemon = rig.start(**settings)
    with Stream(rig, "steady/", every_s=every_s, seed=1) as stream:
        wait_until(lambda: len(accepted_puts(proxy)) >= 5, timeout=20, message=rig.output)
        proxy.down()
        before = len(stream.written)

        def outage_seen() -> bool:
            paused = [e for e in daemon.events("upload_retry_scheduled") if e.get("layer") == "pause"]
            probes = metric(scrape(daemon), "sidecar_s3_requests_total", operation="HeadBucket", status="error")
            return bool(paused) and probes >= min_probes and len(stream.written) >= before + outage_files

        wait_until(outage_seen, timeout=60 + outage_files * every_s * 3, interval=0.2, message=rig.output)
        samples = scrape(daemon)
        assert metric(samples, "sidecar_store_reachable") == 0
        assert metric(samples, "sidecar_store_state", state="down") == 1
        assert metric(samples, "sidecar_uploads_total", outcome="retry") == 0  # the store's fault, not the files'
        assert {row.attempts for row in rig.journal().values()} == {0}
        assert metric(samples, "sidecar_upload_retries_total", error_class="ConnectionError") > 0
        assert metric(samples, "sidecar_queue_files", state="pending") > 0
        assert metric(samples, "sidecar_uploads_total", outcome="failed") == 0
        proxy.up()
        wait_until(lambda: daemon.events("store_recovered"), timeout=60, message=rig.output)
    rig.wait_in_bucket(stream.written, timeout=60 + len(stream.written) / 20)
    rig.wait_idle(daemon, timeout=120)

    assert daemon.is_running()
    assert metric(scrape(daemon), "sidecar_store_reachable") == 1
    assert states(rig.journal()) == {"uploaded": len(stream.written)}
    one_accepted_put_per_file(rig)
    log_lines = sum(len(proc.log_lines()) for proc in rig.procs)
    tally = rig.audit(scenario, outage_files=len(stream.written) - before, log_lines=log_lines)
    # A PUT the store took just before the cut lost only its answer: its retry gets 412 and a HEAD, never a
    # second write; at most one such PUT per worker.
    refused = [r for r in proxy.puts() if r.status == 412]
    assert tally.duplicate_puts == len(refused) <= int(rig.env.get("SIDECAR_WORKERS", "4"))
    assert tally.variant_objects == 0
    assert tally.errors_reported >= 1
    assert [e["level"] for e in daemon.events("store_unavailable")] == ["error"]
    return tally


class Burster:
    """Writer threads landing bursts like a GPU pod: batches of 8 files in new folders, written at once, via
    tmp-then-rename, or in place in chunks with the descriptor held open (PIL), until stopped."""

    def __init__(self, rig: Rig, seed: int) -> None:
        self.rig = rig
        self.rng = random.Random(seed)
        self.written: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(lane,), daemon=True) for lane in range(2)]

    def _one(self, rel: str, kind: str, data: bytes) -> None:
        path = self.rig.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rig.remember(rel, data)
        if kind == "tmp":
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        elif kind == "chunked":
            with path.open("wb") as out:
                for start in range(0, len(data), len(data) // 3 + 1):
                    out.write(data[start : start + len(data) // 3 + 1])
                    out.flush()
                    self._stop.wait(0.03)  # the writer is still encoding: part of how this file is written
        else:
            path.write_bytes(data)

    def _run(self, lane: int) -> None:
        n = 0
        while not self._stop.is_set():
            for _ in range(8):
                kind = self.rng.choice(("once", "once", "tmp", "chunked"))
                rel = f"lane{lane}/batch_{n // 8:04d}/{kind}_{n:05d}_.png"
                self._one(rel, kind, payload(self.rng, 300, 6_000))
                self.written.append(rel)
                n += 1
            self._stop.wait(0.1)  # the pace of the producer

    def __enter__(self) -> Burster:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def kill_loop(rig: Rig, kills: int, seed: int, workers: int = 4) -> None:
    """Kill -9 the daemon ``kills`` times at random moments of a burst, restart, and audit."""
    assert rig.proxy is not None
    rng = random.Random(seed)
    rig.proxy.delay(0.03, when=is_put)  # keep uploads in flight, so kills land mid-request
    inflight_at_kill: list[int] = []
    moments: Counter[str] = Counter()
    with Burster(rig, seed) as burst:
        for _ in range(kills):
            moment = rng.choice(("startup", "uploads", "uploads", "uploads"))
            daemon = rig.start(wait=False, workers=workers)
            if moment == "startup":
                wait_until(lambda d=daemon: d.events("daemon_starting"), timeout=20, message=rig.output)  # type: ignore[misc]
            else:
                target = len(rig.proxy.puts()) + rng.randint(1, 25)
                wait_until(lambda t=target: len(rig.proxy.puts()) >= t, timeout=30, message=rig.output)  # type: ignore[misc,union-attr]
            moments[moment] += 1
            assert daemon.kill() == -signal.SIGKILL
            inflight_at_kill.append(states(rig.journal())["uploading"])
    rig.proxy.delay(0)
    daemon = rig.start(workers=workers)
    rig.wait_in_bucket(burst.written, timeout=90)
    rig.wait_idle(daemon, timeout=60)

    files = len(burst.written)
    assert states(rig.journal()) == {"uploaded": files}
    assert rig.objects() == rig.expected()  # every file, byte-identical, and no variant of our own retries
    reached = [r for r in rig.proxy.puts() if r.origin in ("upstream", "rule")]
    assert accepted_puts(rig.proxy) == Counter(set(rig.expected()))
    re_uploads = len(reached) - files
    assert all(n <= workers for n in inflight_at_kill), inflight_at_kill
    assert re_uploads <= sum(inflight_at_kill), (re_uploads, inflight_at_kill)
    tally = rig.audit(f"kill -9 at random moments during a burst ({kills} kills)", kills=kills,
                      re_uploads=re_uploads, inflight_at_kills=sum(inflight_at_kill), moments=dict(moments))
    assert tally.variant_objects == 0
    assert tally.duplicate_puts == re_uploads


def expected_md5(path: Path, out: dict[str, str]) -> None:
    """MD5 of a file, read into one reused buffer (the test's own, independent of the daemon's)."""
    digest = hashlib.md5()
    buffer = bytearray(8 * MIB)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    out["md5"] = digest.hexdigest()


def sparse_upload(tmp_path: Path, s3: S3Server, gib: float, part_mb: int, scenario: str) -> None:
    """A sparse file of ``gib`` GiB (random marker blocks, holes between) uploaded to the sink: valid equal
    parts, every byte in order, and the daemon's peak memory bounded by its parts, not the file."""
    size = int(gib * 1024**3) + 12_345
    with S3Sink() as sink:
        rig = Rig(tmp_path, s3, "sink", endpoint=sink.endpoint, part_size_mb=part_mb, workers=4)
        try:
            daemon = rig.start()
            assert daemon.pid is not None
            baseline_kib = peak_rss_kib(daemon.pid)
            path = rig.out / "huge" / "render_00001_.mp4"
            path.parent.mkdir()
            rng = random.Random(58)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, size)
                for offset in [*range(0, size - 4096, 1024**3), size - 4096]:
                    os.pwrite(fd, rng.randbytes(4096), offset)
            finally:
                os.close(fd)
            ours: dict[str, str] = {}
            hasher = threading.Thread(target=expected_md5, args=(path, ours))
            hasher.start()
            key = rig.key("huge/render_00001_.mp4")
            wait_until(lambda: key in sink.objects, timeout=60 + gib * 30, interval=0.5, message=rig.output)
            hasher.join()
            rig.wait_idle(daemon)
            peak_kib = peak_rss_kib(daemon.pid)
            obj = sink.objects[key]
            part = part_size_for(size, part_mb * MIB)
            uploads = [u for u in sink.uploads.values() if u.key == key]
            assert sink.errors == []
            # Parts go out in parallel while the file is hashed: the MD5 is in the journal, not the metadata
            assert (obj.size, obj.md5, obj.metadata.get("md5")) == (size, ours["md5"], None)
            assert (obj.part_size, obj.parts) == (part, -(-size // part)) and obj.parts <= 10_000
            assert [u.completed for u in uploads] == [True]
            assert Counter(op for op, _, _ in sink.requests)["CompleteMultipartUpload"] == 1
            assert peak_kib < 256 * 1024, f"peak RSS {peak_kib} KiB for a {gib} GiB file"
            Tally(scenario, files_written=1, in_bucket_identical=1, errors_reported=errors_reported(rig.procs),
                  extra={"file_bytes": size, "parts": obj.parts, "part_bytes": part,
                         "peak_rss_mib": round(peak_kib / 1024, 1),
                         "peak_rss_before_mib": round(baseline_kib / 1024, 1)}).record()
        finally:
            rig.close()
