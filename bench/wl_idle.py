"""Workload 5, idle: 60 s (--quick: 15 s) with nothing new → CPU % of one core, RSS, requests/min.

Every watching tool runs at once, each on its own folder and bucket, after a warm-up: an idle tool barely
competes for CPU, and the loops' cost per pass does not depend on the others. The folders are not empty:
each holds a tree of already-uploaded outputs (POPULATED files, 1 KiB, in folders of 1,000; its bucket
holds the same objects, newer than the files), because a loop's idle cost is its pass over what is there
(a LIST per 1,000 keys, and for rclone's defaults a HEAD per file). The daemon first learns the tree (its
journal is empty: one conditional PUT per file answered 412, and a HEAD) and the window starts when its
requests have stopped. For the daemon the resident memory is read at the start and at the end of the
window, to show growth.
"""

from __future__ import annotations

import shutil
import time

import proctree
from contenders import Ctx, Running, start_watcher
from harness import Sample, fresh_dir, request_summary
from wl_cold import write_tree

NAME = "idle"
DEFAULT_PEERS = ["sidecar", "rclone", "rclone-fast", "rclone-smart", "aws-sync", "aws-cp", "inotify"]
WARMUP_S = 3.0
QUIET_FOR_S = 3.0  # the daemon has caught up with the tree once no request came for this long


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    seconds = 15.0 if ctx.quick else 60.0
    samples = []
    for r in range(runs):
        started: dict[str, tuple[Running, str]] = {}
        try:
            files = 2_000 if ctx.quick else 10_000
            for peer in peers:
                bucket = ctx.server.new_bucket(f"idle-{peer}-{r}")
                watch = fresh_dir(ctx.work / "idle" / peer)
                write_tree(watch, files)
                shutil.copytree(watch, ctx.server.bucket_dir(bucket), dirs_exist_ok=True,
                                copy_function=shutil.copyfile)
                started[peer] = (start_watcher(ctx, peer, watch, bucket, fresh_dir(ctx.work / "state" / bucket),
                                               ready_s=300), bucket)
            time.sleep(WARMUP_S)
            if "sidecar" in started:
                _caught_up(ctx, started["sidecar"][1])
            samplers = {p: proctree.Sampler(run.pid) for p, (run, _) in started.items()}
            before = {p: (run.cpu_s(), ctx.server.requests(b), proctree.vm_hwm(run.pid, "VmRSS"))
                      for p, (run, b) in started.items()}
            for s in samplers.values():
                s.start()
            t0 = time.monotonic()
            time.sleep(seconds)
            wall = time.monotonic() - t0
            for peer, (running, bucket) in started.items():
                cpu0, req0, rss0 = before[peer]
                sampler = samplers[peer].stop()
                requests = ctx.server.requests(bucket) - req0
                rss1 = proctree.vm_hwm(running.pid, "VmRSS")
                sample = Sample(peer=peer, run=r, requests=requests)
                sample.metrics = {
                    "cpu_pct": 100 * (running.cpu_s() - cpu0) / wall,
                    "rss_mb": max(sampler.peak_rss, rss1) / 2**20,
                    "rss_growth_mb": (rss1 - rss0) / 2**20,
                    "requests_per_min": sum(requests.values()) * 60 / wall,
                }
                sample.note = request_summary(requests, 1)[1]
                log(NAME, sample)
                samples.append(sample)
        finally:
            for running, bucket in started.values():
                running.stop()
                ctx.server.drop_bucket(bucket)
    return samples


def _caught_up(ctx: Ctx, bucket: str, cap_s: float = 300.0) -> None:
    """Wait until the daemon's requests to ``bucket`` have stopped for QUIET_FOR_S."""
    deadline = time.monotonic() + cap_s
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = sum(ctx.server.requests(bucket).values())
        if n != last:
            last, quiet_since = n, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_FOR_S:
            return
        time.sleep(0.5)
