"""Workload 4, cold start over a big tree: 100,000 already-uploaded files (--quick: 10,000).

The tree is 1 KiB files in folders of 1,000, like ComfyUI's dated output folders.

sidecar: started once on the tree so its journal learns every file (that upload is reported too: time,
files/s and resident memory after N files, to see whether memory grows with the tree), stopped, then
restarted once per run: measured from the spawn of the process to its ``scan_completed`` log line —
time, peak RSS, CPU, and every request it made to the bucket (goal: zero).
rclone / aws sync: one pass over the same tree into a bucket that already holds it (objects placed
directly in the server's data directory, newer than the files so that `aws s3 sync` skips them).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import proctree
from contenders import Ctx, spawn_watcher, start_watcher
from harness import Sample, fresh_dir, request_summary, run_pass

NAME = "cold"
DEFAULT_PEERS = ["sidecar", "rclone", "aws-sync"]
PER_FOLDER = 1000
SIZE = 1024


def write_tree(root: Path, files: int) -> dict[str, int]:
    pool = os.urandom(SIZE + files)
    old = time.time() - 3600  # yesterday's outputs: older than their objects, as after a real upload
    expected = {}
    for i in range(files):
        folder = root / f"2025-01-{i // PER_FOLDER:03d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        name = f"ComfyUI_{i % PER_FOLDER + 1:05d}_.png"
        (folder / name).write_bytes(pool[i : i + SIZE])
        os.utime(folder / name, (old, old))
        expected[f"{folder.name}/{name}"] = SIZE
    return expected


def total(requests: dict[str, int]) -> int:
    return sum(requests.values())


def populate_sidecar(ctx: Ctx, tree: Path, expected: dict[str, int], bucket: str, state: Path, *,
                     log: callable) -> None:  # type: ignore[valid-type]
    """Let the daemon upload the whole tree once, so that its journal knows every file."""
    t0 = time.time()
    running = start_watcher(ctx, "sidecar", tree, bucket, state, workers=8, ready_s=600)
    cap = time.monotonic() + len(expected) / 50 + 120
    try:
        while time.monotonic() < cap and ctx.server.requests(bucket)["PUT"] < len(expected):
            time.sleep(1.0)
        n, times = ctx.server.arrived(bucket, expected)
        sample = Sample(peer="sidecar-initial-upload", run=0, requests=ctx.server.requests(bucket))
        seconds = (max(times.values()) if times else time.time()) - t0
        sample.metrics = {"files": n, "seconds": seconds, "files_per_s": n / seconds,
                          "rss_mb": proctree.vm_hwm(running.pid, "VmRSS") / 2**20,
                          "peak_rss_mb": proctree.vm_hwm(running.pid) / 2**20}
        sample.finished = n == len(expected)
        sample.note = "" if sample.finished else f"only {n}/{len(expected)} files arrived"
        log(NAME, sample)
    finally:
        time.sleep(1.0)  # let the last journal commits land before the stop
        running.stop(grace=30)


def restart_sidecar(ctx: Ctx, tree: Path, bucket: str, state: Path, *, run: int, cap_s: float) -> Sample:
    before = ctx.server.requests(bucket)
    t0 = time.monotonic()
    running = spawn_watcher(ctx, "sidecar", tree, bucket, state)
    sampler = proctree.Sampler(running.pid)
    sampler.start()
    sample = Sample(peer="sidecar", run=run)
    try:
        done = proctree.wait_until(lambda: running.log_has('"scan_completed"'), cap_s, interval=0.02)
        seconds = time.monotonic() - t0
        cpu = running.cpu_s()
        hwm, rss = proctree.vm_hwm(running.pid), proctree.vm_hwm(running.pid, "VmRSS")
        time.sleep(1.0)  # requests that follow the scan still count
    finally:
        sampler.stop()
        running.stop(grace=10)
    sample.requests = ctx.server.requests(bucket) - before
    sample.finished = done
    sample.metrics = {"seconds": seconds, "peak_rss_mb": max(hwm, sampler.peak_hwm) / 2**20,
                      "rss_mb": rss / 2**20, "cpu_s": cpu, "requests": total(sample.requests)}
    sample.note = request_summary(sample.requests, 1)[1] + scan_fields(running.log)
    if not done:
        sample.note = f"DNF: no scan_completed within {cap_s:.0f} s; " + sample.note
    return sample


def scan_fields(log: Path) -> str:
    """The fields of the daemon's last scan_completed line, for the notes."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if '"scan_completed"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                return ""
            keep = {k: v for k, v in data.items() if k not in ("event", "level", "timestamp", "logger")}
            return "; scan_completed " + json.dumps(keep, separators=(",", ":"))
    return ""


def one_pass(ctx: Ctx, peer: str, tree: Path, bucket: str, *, run: int, cap_s: float) -> Sample:
    argv = {
        "rclone": [ctx.rclone, "copy", str(tree), f"bench:{bucket}", "--transfers", "8", "-q",
                   "--no-update-modtime"],
        "aws-sync": [ctx.aws, "--endpoint-url", ctx.server.endpoint, "s3", "sync", str(tree),
                     f"s3://{bucket}/", "--only-show-errors"],
    }[peer]
    before = ctx.server.requests(bucket)
    seconds, cpu, maxrss, rc = run_pass(ctx, argv, cap_s)
    sample = Sample(peer=peer, run=run, requests=ctx.server.requests(bucket) - before, finished=rc == 0)
    sample.metrics = {"seconds": seconds, "peak_rss_mb": maxrss / 2**20, "cpu_s": cpu,
                      "requests": total(sample.requests)}
    sample.note = ("" if rc == 0 else f"exit {rc}; ") + request_summary(sample.requests, 1)[1]
    return sample


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    files = 10_000 if ctx.quick else 100_000
    cap = 120.0 if ctx.quick else 600.0
    tree = fresh_dir(ctx.work / "cold-tree")
    expected = write_tree(tree, files)
    samples = []
    if "sidecar" in peers:
        bucket = ctx.server.new_bucket("cold-sidecar")
        state = fresh_dir(ctx.work / "state" / bucket)
        populate_sidecar(ctx, tree, expected, bucket, state, log=lambda n, s: (samples.append(s), log(n, s)))
        for r in range(runs):
            samples.append(restart_sidecar(ctx, tree, bucket, state, run=r, cap_s=cap))
            log(NAME, samples[-1])
        ctx.server.drop_bucket(bucket)
    others = [p for p in peers if p != "sidecar"]
    if others:
        bucket = ctx.server.new_bucket("cold-copy")
        shutil.copytree(tree, ctx.server.bucket_dir(bucket), dirs_exist_ok=True, copy_function=shutil.copyfile)
        for r in range(runs):
            for peer in others:
                samples.append(one_pass(ctx, peer, tree, bucket, run=r, cap_s=cap))
                log(NAME, samples[-1])
        ctx.server.drop_bucket(bucket)
    shutil.rmtree(tree, ignore_errors=True)
    return samples
