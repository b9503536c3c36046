"""Workload 7, scale: a restart over 1,000,000 already-uploaded files (daemon only).

The tree is 1,000,000 files of 64 bytes in folders of 1,000 on the work disk (/var/tmp, not a tmpfs).
The journal is filled with every file as uploaded through the journal's own API (bench/fill_journal.py:
``record``, ``claim``, ``mark_uploaded``); the bucket is empty, so any request the restart made for these
files would be in the server's log. Per run: spawn -> ``scan_completed`` time, peak RSS, CPU, requests.
Then, with the daemon up and 1M rows in its journal: the time of a ``/metrics`` scrape, and the
close -> committed latency of 40 new files written while a scraper loops on ``/metrics`` without pause,
against 40 written with no scraper (does a scrape hold uploads up?). Journal bytes per file are reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import proctree
from contenders import Ctx, spawn_watcher
from harness import Sample, fresh_dir, request_summary
from lbserver import free_port
from wl_cold import scan_fields
from wl_steady import pct

NAME = "million"
DEFAULT_PEERS = ["sidecar"]
FILES = 1_000_000
PER_FOLDER = 1000
SIZE = 64
PROBE_FILES = 40


def write_tree(root: Path, files: int) -> None:
    old = time.time() - 3600
    pool = os.urandom(SIZE + files % 65536 + 65536)
    for i in range(files):
        folder = root / f"2025-{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"ComfyUI_{i % PER_FOLDER + 1:05d}_.png"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, pool[i % 65536 : i % 65536 + SIZE])
        os.close(fd)
        os.utime(path, (old, old))


def scrape(port: int) -> float:
    t = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        r.read()
    return time.monotonic() - t


def probe(ctx: Ctx, tree: Path, bucket: str, tag: str, *, scraper_port: int | None) -> tuple[list[float], int]:
    """Write PROBE_FILES new files; their close -> committed latencies, and the scrapes done meanwhile."""
    stop, scrapes = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            scrape(scraper_port or 0)
            scrapes[0] += 1

    thread = threading.Thread(target=loop, daemon=True) if scraper_port else None
    if thread:
        thread.start()
    closed, expected = {}, {}
    for i in range(PROBE_FILES):
        key = f"new-{tag}/probe_{i:03d}.png"
        (tree / key).write_bytes(os.urandom(100_000))
        closed[key], expected[key] = time.time(), 100_000
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ctx.server.arrived(bucket, expected)[0] < len(expected):
        time.sleep(0.05)
    stop.set()
    if thread:
        thread.join(timeout=60)
    times = ctx.server.arrived(bucket, expected)[1]
    return [times[k] - closed[k] for k in times], scrapes[0]


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    samples: list[Sample] = []
    if "sidecar" not in peers:
        return samples
    tree = fresh_dir(ctx.work / "million-tree")
    state = fresh_dir(ctx.work / "state" / "million")
    journal = state / "sidecar-state" / "journal.sqlite3"
    t0 = time.monotonic()
    write_tree(tree, FILES)
    made = time.monotonic() - t0
    subprocess.run([ctx.python, str(ctx.bench / "fill_journal.py"), "--tree", str(tree), "--journal", str(journal)],
                   check=True, env={**os.environ, "PYTHONPATH": str(ctx.repo)})
    filled = time.monotonic() - t0 - made
    journal_bytes = sum(p.stat().st_size for p in journal.parent.glob("journal.sqlite3*"))
    bucket = ctx.server.new_bucket("million")
    for r in range(runs):
        port = free_port()
        rctx = dataclasses.replace(ctx, sidecar_env={**ctx.sidecar_env, "SIDECAR_HTTP_PORT": str(port)})
        for tag in (f"quiet-{r}", f"scraped-{r}"):  # watched from the start: the files get close events
            (tree / f"new-{tag}").mkdir()
        before = ctx.server.requests(bucket)
        start = time.monotonic()
        running = spawn_watcher(rctx, "sidecar", tree, bucket, state)
        sampler = proctree.Sampler(running.pid)
        sampler.start()
        sample = Sample(peer="sidecar", run=r)
        try:
            done = proctree.wait_until(lambda w=running: w.log_has('"scan_completed"'), 120, interval=0.02)
            seconds = time.monotonic() - start
            cpu = running.cpu_s()
            hwm = proctree.vm_hwm(running.pid)
            time.sleep(1.0)
            requests = ctx.server.requests(bucket) - before
            scrape_s = sorted(scrape(port) for _ in range(5))[2] if done else float("nan")
            quiet, _ = probe(ctx, tree, bucket, f"quiet-{r}", scraper_port=None) if done else ([], 0)
            busy, scrapes = probe(ctx, tree, bucket, f"scraped-{r}", scraper_port=port) if done else ([], 0)
            rss = proctree.vm_hwm(running.pid, "VmRSS")
        finally:
            sampler.stop()
            running.stop(grace=10)
        sample.requests = requests
        sample.finished = done
        sample.metrics = {
            "files": FILES, "seconds": seconds, "peak_rss_mb": max(hwm, sampler.peak_hwm) / 2**20,
            "rss_after_mb": rss / 2**20, "cpu_s": cpu, "requests": sum(requests.values()),
            "scrape_s": scrape_s, "journal_bytes_per_file": journal_bytes / FILES,
            "probe_p50_ms": pct([x * 1000 for x in quiet], 50), "probe_max_ms": max(quiet, default=0) * 1000,
            "scraped_p50_ms": pct([x * 1000 for x in busy], 50), "scraped_max_ms": max(busy, default=0) * 1000,
            "scrapes_during_probe": scrapes, "tree_s": made, "fill_s": filled,
        }
        sample.note = request_summary(requests, 1)[1] + journal_check(running.log) + scan_fields(running.log)
        if not done:
            sample.note = "DNF: no scan_completed within 120 s; " + sample.note
        log(NAME, sample)
        samples.append(sample)
        for extra in tree.glob("new-*"):
            for f in extra.iterdir():
                f.unlink()
            extra.rmdir()
    samples.append(after_kill(ctx, tree, bucket, state, log))
    ctx.server.drop_bucket(bucket)
    return samples


def after_kill(ctx: Ctx, tree: Path, bucket: str, state: Path, log: callable) -> Sample:  # type: ignore[valid-type]
    """A restart after kill -9 (no clean-close mark: the journal's integrity check runs): spawn -> scan_completed."""
    sample = Sample(peer="sidecar, restart after kill -9", run=0)
    running = spawn_watcher(ctx, "sidecar", tree, bucket, state)
    try:
        proctree.wait_until(lambda: running.log_has('"scan_completed"'), 120, interval=0.02)
    finally:
        running.kill_session(signal.SIGKILL)
        running.popen.wait(timeout=10)
    before = ctx.server.requests(bucket)
    start = time.monotonic()
    running = spawn_watcher(ctx, "sidecar", tree, bucket, state)
    sampler = proctree.Sampler(running.pid)
    sampler.start()
    try:
        done = proctree.wait_until(lambda: running.log_has('"scan_completed"'), 120, interval=0.02)
        seconds = time.monotonic() - start
        cpu = running.cpu_s()
        hwm = proctree.vm_hwm(running.pid)
        time.sleep(1.0)
        requests = ctx.server.requests(bucket) - before
    finally:
        sampler.stop()
        running.stop(grace=10)
    sample.finished = done
    sample.requests = requests
    sample.metrics = {"files": FILES, "seconds": seconds, "peak_rss_mb": max(hwm, sampler.peak_hwm) / 2**20,
                      "cpu_s": cpu, "requests": sum(requests.values())}
    sample.note = request_summary(requests, 1)[1] + journal_check(running.log) + scan_fields(running.log)
    log(NAME, sample)
    return sample


def journal_check(log_path: Path) -> str:
    """How the daemon's start judged its journal (checked, or trusted after a clean close), for the notes."""
    for line in log_path.read_text(errors="replace").splitlines():
        if '"daemon_starting"' in line:
            try:
                return "; journal " + str(json.loads(line).get("journal_check", "?"))
            except ValueError:
                return ""
    return ""
