"""Workload 8, memory: what the daemon holds while it uploads, and whether that grows with files seen.

``4x60MB``  four 60 MB files (below the 64 MiB multipart threshold: single PUTs) written at once, the
            daemon with its default 4 workers: peak RSS (the process's VmHWM) and time. The reference is
            boto3 put_object x4 with the whole bodies in memory (peers/boto3_pool.py), on the same files.
``stream``  20,000 files of 20 KB written in 4 waves of 5,000; the daemon's RSS after each wave has been
            uploaded. Flat means the last wave's RSS is within a few MB of the first's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import proctree
from contenders import Ctx, start_watcher
from harness import Sample, fresh_dir, integrity, measure_ceiling, measure_watcher, request_summary

NAME = "memory"
DEFAULT_PEERS = ["boto3", "sidecar"]
BIG = 60_000_000
WAVES, PER_WAVE, SMALL = 4, 5000, 20_000


def write_four(folder: Path, expected: dict[str, int], closed: dict[str, float]) -> None:
    fds = {}
    for i in range(4):
        name = f"ComfyUI_{i + 1:05d}_.mp4"
        fds[name] = open(folder / name, "wb")  # noqa: SIM115 - four writers at once, closed below
    block = os.urandom(4 * 2**20)
    for offset in range(0, BIG, len(block)):
        for n, f in enumerate(fds.values()):
            f.write((offset + n).to_bytes(8, "big") + block[8 : min(len(block), BIG - offset)])
    for name, f in fds.items():
        f.close()
        expected[name], closed[name] = BIG, time.time()


def four_big(ctx: Ctx, peer: str, run: int) -> Sample:
    bucket = ctx.server.new_bucket(f"memory-{peer}-{run}")
    if peer == "boto3":
        src = fresh_dir(ctx.work / "memory-src")
        write_four(src, {}, {})
        obs = measure_ceiling(ctx, src, bucket, "put", threads=4, cap_s=120)
    else:
        watch = fresh_dir(ctx.work / "watch")
        obs = measure_watcher(ctx, peer, bucket, watch, fresh_dir(ctx.work / "state" / bucket),
                              writer=lambda exp, clo: write_four(watch, exp, clo), cap_s=120, poll_s=0.05)
    sample = Sample(peer=f"{peer}/4x60MB", run=run, requests=obs.requests, finished=obs.finished)
    sample.metrics = {"peak_rss_mb": max(obs.peak_rss, obs.peak_hwm) / 2**20, **integrity(obs),
                      "seconds": obs.last_commit - obs.t0, "requests": sum(obs.requests.values())}
    sample.note = request_summary(obs.requests, 4)[1]
    ctx.server.drop_bucket(bucket)
    return sample


def stream(ctx: Ctx, run: int) -> Sample:
    bucket = ctx.server.new_bucket(f"memory-stream-{run}")
    watch = fresh_dir(ctx.work / "watch")
    running = start_watcher(ctx, "sidecar", watch, bucket, fresh_dir(ctx.work / "state" / bucket), workers=8)
    pool = os.urandom(SMALL + PER_WAVE * WAVES)
    rss: list[float] = []
    sample = Sample(peer="sidecar/stream", run=run)
    try:
        expected: dict[str, int] = {}
        for wave in range(WAVES):
            folder = watch / f"wave-{wave}"
            folder.mkdir()
            for i in range(PER_WAVE):
                n = wave * PER_WAVE + i
                (folder / f"ComfyUI_{i + 1:05d}_.png").write_bytes(pool[n : n + SMALL])
                expected[f"wave-{wave}/ComfyUI_{i + 1:05d}_.png"] = SMALL
            proctree.wait_until(lambda: ctx.server.arrived(bucket, expected)[0] == len(expected), 300, interval=0.5)
            time.sleep(1.0)
            rss.append(proctree.vm_hwm(running.pid, "VmRSS") / 2**20)
        arrived = ctx.server.arrived(bucket, expected)[0]
    finally:
        running.stop()
    sample.requests = ctx.server.requests(bucket)
    sample.finished = arrived == len(expected)
    sample.metrics = {f"rss_after_wave_{w + 1}_mb": v for w, v in enumerate(rss)}
    sample.metrics.update(files=len(expected), arrived=arrived, rss_growth_mb=rss[-1] - rss[0] if rss else 0.0)
    sample.note = request_summary(sample.requests, len(expected))[1]
    ctx.server.drop_bucket(bucket)
    return sample


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    samples = []
    for r in range(runs):
        for peer in peers:
            samples.append(four_big(ctx, peer, r))
            log(NAME, samples[-1])
        if "sidecar" in peers:
            samples.append(stream(ctx, r))
            log(NAME, samples[-1])
    return samples
