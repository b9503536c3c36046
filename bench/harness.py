"""Measuring one tool on one workload run: start it, feed it files, wait for the bucket, account its cost."""

from __future__ import annotations

import filecmp
import json
import os
import resource
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import proctree
from contenders import Ctx, start_watcher

# A writer fills ``expected`` (key -> size) and ``closed`` (key -> time the file was closed) as it goes.
Writer = Callable[[dict[str, int], dict[str, float]], None]


@dataclass
class Sample:
    """One tool, one run of one workload."""

    peer: str
    run: int
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    finished: bool = True
    requests: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, object]:
        return {"peer": self.peer, "run": self.run, "metrics": self.metrics, "note": self.note,
                "finished": self.finished, "requests": dict(self.requests)}


@dataclass
class Observed:
    """What a measured run saw."""

    t0: float
    expected: dict[str, int]
    closed: dict[str, float]
    committed: dict[str, float]
    cpu_s: float
    peak_rss: int
    peak_hwm: int
    peak_procs: int
    requests: Counter[str]
    stop_reason: str  # "" when every expected file arrived
    background_cores: float = 0.0  # machine CPU used by anything but the tool, the server and the bench
    checked: int = 0  # objects whose bytes were compared with their file
    mismatched: int = 0  # ... and differed (torn, partial or other bytes)
    extra_keys: int = 0  # objects under keys no file has (variant keys, temp names)
    stopped_after_s: float = 0.0  # when the run was cut short (time cap / memory guard), seconds after t0

    @property
    def finished(self) -> bool:
        return not self.stop_reason

    @property
    def last_commit(self) -> float:
        return max(self.committed.values()) if self.committed else float("nan")


class Meter:
    """Snapshots of the machine's busy CPU, the server's and the bench's own, to estimate background load."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.start = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return (time.monotonic(), proctree.machine_busy_s(), self.ctx.server.cpu_s(), own.ru_utime + own.ru_stime)

    def background_cores(self, tool_cpu_s: float) -> float:
        wall, busy, server, own = (b - a for a, b in zip(self.start, self._now(), strict=True))
        return max(0.0, busy - server - own - tool_cpu_s) / wall if wall > 0 else 0.0


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def measure_watcher(
    ctx: Ctx, peer: str, bucket: str, watch: Path, state: Path, *, writer: Writer, cap_s: float,
    workers: int = 0, poll_s: float = 0.1,
) -> Observed:
    """Start ``peer`` watching ``watch``, run ``writer``, wait until every file is in ``bucket`` or cap_s."""
    try:
        running = start_watcher(ctx, peer, watch, bucket, state, workers=workers)
    except RuntimeError as exc:  # a tool that does not start is a result (DNF), not the end of the bench
        return Observed(t0=time.time(), expected={}, closed={}, committed={}, cpu_s=0.0, peak_rss=0, peak_hwm=0,
                        peak_procs=0, requests=Counter(), stop_reason=f"did not start: {str(exc)[-300:]}")
    limits = proctree.Limits(deadline=time.monotonic() + cap_s + 2)
    sampler = proctree.Sampler(running.pid, limits=limits)
    expected: dict[str, int] = {}
    closed: dict[str, float] = {}
    committed: dict[str, float] = {}
    reason = "time cap"
    try:
        sampler.start()
        cpu0 = running.cpu_s()
        meter = Meter(ctx)
        t0 = time.time()
        thread = threading.Thread(target=writer, args=(expected, closed), daemon=True)
        thread.start()
        deadline = time.monotonic() + cap_s
        while time.monotonic() < deadline and not sampler.tripped:
            time.sleep(poll_s)
            writing = thread.is_alive()
            want = dict(expected)
            n, now = ctx.server.arrived(bucket, want)
            for key, t in now.items():  # the first full commit: loops that re-upload move the mtime on
                committed.setdefault(key, t)
            if not writing and n == len(want):
                reason = ""
                break
        cpu1 = running.cpu_s()
        background = meter.background_cores(cpu1 - cpu0)
        reason = sampler.tripped or reason
        stopped = (sampler.tripped_at or time.time()) - t0
    finally:
        sampler.stop()
        running.stop()
    thread.join(timeout=30)
    time.sleep(0.3)  # the server logs a request just after answering it: let the last lines land
    for key, t in ctx.server.arrived(bucket, dict(expected))[1].items():
        committed.setdefault(key, t)
    checked, mismatched, extra = verify_bytes(ctx, bucket, watch, expected)
    return Observed(
        t0=t0, expected=dict(expected), closed=dict(closed), committed=committed, cpu_s=cpu1 - cpu0,
        peak_rss=sampler.peak_rss, peak_hwm=sampler.peak_hwm, peak_procs=sampler.peak_procs,
        requests=ctx.server.requests(bucket), stop_reason=reason, background_cores=background,
        stopped_after_s=stopped if reason else 0.0, checked=checked, mismatched=mismatched, extra_keys=extra,
    )


def verify_bytes(ctx: Ctx, bucket: str, src: Path, expected: dict[str, int]) -> tuple[int, int, int]:
    """Compare every object of ``bucket`` with its file below ``src``, byte for byte (from the server's data
    directory: no request). Returns (objects compared, objects that differ, objects under unexpected keys)."""
    found = ctx.server.objects(bucket)
    checked = mismatched = 0
    for key in found:
        if key not in expected:
            continue
        checked += 1
        try:
            same = filecmp.cmp(ctx.server.bucket_dir(bucket) / key, src / key, shallow=False)
        except OSError:
            same = False  # the file is gone locally: nothing to compare with, counted as a difference
        mismatched += not same
    return checked, mismatched, sum(1 for key in found if key not in expected)


def integrity(obs: Observed) -> dict[str, float]:
    """The byte checks of a run as metrics."""
    return {"bytes_checked": obs.checked, "bytes_mismatched": obs.mismatched, "extra_keys": obs.extra_keys}


def measure_ceiling(ctx: Ctx, src: Path, bucket: str, mode: str, *, threads: int, cap_s: float) -> Observed:
    """Upload the files already in ``src`` with peers/boto3_pool.py; time it from the 'go' to the last commit."""
    expected = {
        str(p.relative_to(src)): p.stat().st_size for p in src.rglob("*") if p.is_file()
    }
    argv = [ctx.python, str(ctx.bench / "peers" / "boto3_pool.py"), "--dir", str(src), "--bucket", bucket,
            "--endpoint", ctx.server.endpoint, "--threads", str(threads), "--mode", mode]
    env = ctx.base_env()
    if mode == "sidecar-store":
        env["PYTHONPATH"] = str(ctx.repo)
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    sampler = proctree.Sampler(proc.pid, limits=proctree.Limits(deadline=time.monotonic() + cap_s + 30))
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("boto3_pool.py did not start")
        sampler.start()
        cpu0 = proctree.cpu_s(proc.pid)
        meter = Meter(ctx)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        cpu1 = proctree.cpu_s(proc.pid)
        background = meter.background_cores(cpu1 - cpu0)
        result = json.loads(line) if line.strip() else {"start": time.time(), "times": {}}
    finally:
        sampler.stop()
        proctree.kill_session(proc.pid)
        proc.wait()
    time.sleep(0.3)  # the server logs a request just after answering it: let the last lines land
    _, committed = ctx.server.arrived(bucket, expected)
    checked, mismatched, extra = verify_bytes(ctx, bucket, src, expected)
    return Observed(
        t0=result["start"], expected=expected, closed=result.get("times", {}), committed=committed,
        cpu_s=cpu1 - cpu0, peak_rss=sampler.peak_rss, peak_hwm=sampler.peak_hwm,
        peak_procs=sampler.peak_procs, requests=ctx.server.requests(bucket),
        stop_reason="" if len(committed) == len(expected) else "not all files arrived",
        background_cores=background, checked=checked, mismatched=mismatched, extra_keys=extra,
    )


def run_pass(ctx: Ctx, argv: list[str], cap_s: float) -> tuple[float, float, int, int]:
    """Run one command to completion: (wall s, CPU s of it and its reaped children, peak RSS bytes, rc)."""
    t = time.monotonic()
    proc = subprocess.Popen(argv, env=ctx.base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    timer = threading.Timer(cap_s, proctree.kill_session, args=(proc.pid,))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (time.monotonic() - t, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, proc.returncode)


def request_summary(requests: Counter[str], files: int) -> tuple[float, str]:
    """(requests per file, "PUT 1000 · HEAD 1000 · LIST 2") — every request the bucket saw."""
    total = sum(requests.values())
    detail = " · ".join(f"{op} {n}" for op, n in requests.most_common())
    return (total / files if files else float("nan")), detail or "none"
