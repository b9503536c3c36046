"""Workload 3, large file: one 1 GiB file (--quick: 256 MiB), written in place as fast as possible.

Throughput is size / (commit of the object - close of the file); for the ceiling (boto3's managed
``upload_file``, 8 threads) it is measured from its 'go'. Peak RSS is the largest resident set the tool's
process tree reached (summed over its processes, sampled every 0.2 s, or a process's own VmHWM).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from contenders import PEERS, Ctx
from harness import Observed, Sample, fresh_dir, integrity, measure_ceiling, measure_watcher, request_summary

NAME = "large"
DEFAULT_PEERS = ["boto3", "sidecar", "rclone", "rclone-fast", "rclone-smart", "aws-cp", "aws-sync", "inotify"]
QUICK_PEERS = ["boto3", "sidecar", "rclone-smart", "aws-cp"]
NAME_IN_TREE = "ComfyUI_00001_.mp4"
BLOCK = 8 * 2**20


def write_big(folder: Path, size: int, block: bytes, expected: dict[str, int], closed: dict[str, float]) -> None:
    expected[NAME_IN_TREE] = size
    with open(folder / NAME_IN_TREE, "wb") as f:
        for offset in range(0, size, len(block)):
            piece = offset.to_bytes(8, "big") + block[8 : min(len(block), size - offset)]  # no two blocks alike
            f.write(piece)
    closed[NAME_IN_TREE] = time.time()


def summarise(peer: str, run: int, obs: Observed, size: int) -> Sample:
    sample = Sample(peer=peer, run=run, requests=obs.requests, finished=obs.finished)
    per_file, detail = request_summary(obs.requests, 1)
    start = obs.closed.get(NAME_IN_TREE, obs.t0) if PEERS[peer].kind == "watch" else obs.t0
    sample.metrics = {"peak_rss_mb": max(obs.peak_rss, obs.peak_hwm) / 2**20, "requests": per_file,
                      "cpu_s": obs.cpu_s, "background_cores": obs.background_cores, **integrity(obs)}
    if obs.finished:
        seconds = obs.last_commit - start
        sample.metrics.update(seconds=seconds, mib_per_s=size / 2**20 / seconds)
    else:
        sample.note = f"DNF ({obs.stop_reason})"
    sample.note = "; ".join(x for x in (sample.note, detail) if x)
    return sample


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    size = (256 if ctx.quick else 1024) * 2**20
    cap = 90.0 if ctx.quick else 240.0
    samples = []
    for r in range(runs):
        block = os.urandom(BLOCK)
        for peer in peers:
            bucket = ctx.server.new_bucket(f"large-{peer}-{r}")
            if PEERS[peer].kind == "ceiling":
                src = fresh_dir(ctx.work / "large-src")
                write_big(src, size, block, {}, {})
                obs = measure_ceiling(ctx, src, bucket, "upload-file", threads=8, cap_s=cap)
            else:
                watch = fresh_dir(ctx.work / "watch")
                obs = measure_watcher(
                    ctx, peer, bucket, watch, fresh_dir(ctx.work / "state" / bucket),
                    writer=lambda exp, clo, w=watch, b=block: write_big(w, size, b, exp, clo), cap_s=cap, poll_s=0.05,
                )
            sample = summarise(peer, r, obs, size)
            log(NAME, sample)
            samples.append(sample)
            ctx.server.drop_bucket(bucket)
        fresh_dir(ctx.work / "watch")
        fresh_dir(ctx.work / "large-src")
    return samples
