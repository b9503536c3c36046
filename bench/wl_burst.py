"""Workload 1, burst: 1,000 files of 200 KB written as fast as possible.

Measured from the first byte written (for the ceiling: from its 'go', files already on disk) to the
commit of the last object. CPU is the tool's whole process tree over that window; requests are every
request the server logged for the run's bucket.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from contenders import CEILING_MODES, PEERS, Ctx
from harness import Observed, Sample, fresh_dir, integrity, measure_ceiling, measure_watcher, request_summary

NAME = "burst"
# The per-file-process peer goes last: its fork storm must not run just before another tool.
DEFAULT_PEERS = ["boto3", "boto3-md5", "sidecar-store", "sidecar", "rclone", "rclone-fast", "rclone-smart",
                 "aws-cp", "aws-sync", "inotify"]
QUICK_PEERS = ["boto3", "sidecar-store", "sidecar", "rclone", "rclone-smart", "aws-sync", "inotify"]
FILES = 1000
SIZE = 200_000
WORKERS = 8


def _pool() -> bytes:
    return os.urandom(SIZE + FILES * 7)


def file_name(i: int) -> str:
    return f"ComfyUI_{i + 1:05d}_.png"


def write_all(folder: Path, pool: bytes, expected: dict[str, int], closed: dict[str, float]) -> None:
    for i in range(FILES):
        name = file_name(i)
        expected[name] = SIZE
        with open(folder / name, "wb") as f:
            f.write(pool[i * 7 : i * 7 + SIZE])  # every file different
        closed[name] = time.time()


def summarise(peer: str, run: int, obs: Observed) -> Sample:
    arrived = len(obs.committed)
    per_file, detail = request_summary(obs.requests, arrived or 1)
    sample = Sample(peer=peer, run=run, requests=obs.requests, finished=obs.finished)
    sample.metrics = {
        "arrived": arrived,
        "cpu_s_per_1000": obs.cpu_s * 1000 / arrived if arrived else float("inf"),
        "cpu_s": obs.cpu_s,
        "requests_per_file": per_file,
        "peak_rss_mb": obs.peak_rss / 2**20,
        "peak_procs": obs.peak_procs,
        "background_cores": obs.background_cores, **integrity(obs),
    }
    if obs.finished:
        seconds = obs.last_commit - obs.t0
        sample.metrics.update(seconds=seconds, files_per_s=FILES / seconds)
    else:
        sample.note = (f"DNF, stopped by {obs.stop_reason} after {obs.stopped_after_s:.0f} s: "
                       f"{arrived}/{FILES} files arrived ({len(obs.closed)} written) for {obs.cpu_s:.0f} CPU s, "
                       f"peak {obs.peak_procs} processes, {obs.peak_rss / 2**30:.1f} GiB resident")
    sample.metrics["requests"] = sum(obs.requests.values())
    sample.note = "; ".join(x for x in (sample.note, detail) if x)
    return sample


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    samples = []
    for r in range(runs):
        pool = _pool()
        src = fresh_dir(ctx.work / "burst-src")
        write_all(src, pool, {}, {})
        for peer in peers:
            bucket = ctx.server.new_bucket(f"burst-{peer}-{r}")
            if PEERS[peer].kind == "ceiling":
                obs = measure_ceiling(ctx, src, bucket, CEILING_MODES[peer], threads=8, cap_s=120)
            else:
                cap = (30 if ctx.quick else 60) if peer == "inotify" else 120
                watch = fresh_dir(ctx.work / "watch")
                obs = measure_watcher(
                    ctx, peer, bucket, watch, fresh_dir(ctx.work / "state" / bucket),
                    writer=lambda exp, clo, w=watch, p=pool: write_all(w, p, exp, clo), cap_s=cap, workers=WORKERS,
                )
            sample = summarise(peer, r, obs)
            log(NAME, sample)
            samples.append(sample)
            ctx.server.drop_bucket(bucket)
    return samples
