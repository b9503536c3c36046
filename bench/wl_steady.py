"""Workload 2, steady stream like ComfyUI: PNG-sized files (0.5-3 MB) at a fixed rate, written in place.

Each file is written onto its final name in CHUNKS pieces with a short pause between them, as PIL's
``save()`` does while it encodes, then closed. Latency is per file: the object's commit time (its mtime
in the server's data directory, so measuring adds no request) minus the moment the writer closed it.
The same files are then PUT one at a time with raw boto3 ("raw PUT") as the floor to compare with.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import stages
from contenders import Ctx
from harness import Observed, Sample, fresh_dir, integrity, measure_ceiling, measure_watcher, request_summary

NAME = "steady"
DEFAULT_PEERS = ["sidecar", "rclone", "rclone-fast", "rclone-smart", "aws-sync", "aws-cp", "inotify"]
QUICK_PEERS = ["sidecar", "rclone", "rclone-smart", "aws-sync", "inotify"]
RATE = 4.0  # files per second (ComfyUI on a GPU pod; FIELD-NOTES §2 has ~4/s of 2.6 MB PNGs on 2 CPU cores)
CHUNKS = 8
PAUSE_S = 0.02
MIN_SIZE, MAX_SIZE = 500_000, 3_000_000


def plan(run: int, seconds: float) -> list[tuple[str, int]]:
    rng = random.Random(1000 + run)
    return [(f"ComfyUI_{i + 1:05d}_.png", rng.randint(MIN_SIZE, MAX_SIZE)) for i in range(int(seconds * RATE))]


def write_one(path: Path, data: memoryview, pause_s: float) -> None:
    step = -(-len(data) // CHUNKS)
    with open(path, "wb") as f:
        for start in range(0, len(data), step):
            if start:
                f.flush()
                time.sleep(pause_s)
            f.write(data[start : start + step])


def stream(folder: Path, files: list[tuple[str, int]], pool: bytes, expected: dict[str, int],
           closed: dict[str, float], *, rate: float = RATE, pause_s: float = PAUSE_S) -> None:
    """Write ``files`` into ``folder`` at ``rate`` per second (0: all at once, no pauses)."""
    view = memoryview(pool)
    start = time.monotonic()
    for i, (name, size) in enumerate(files):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        expected[name] = size
        write_one(folder / name, view[i * 13 : i * 13 + size], pause_s if rate else 0)
        closed[name] = time.time()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_metrics(latencies_s: list[float], prefix: str = "") -> dict[str, float]:
    ms = [x * 1000 for x in latencies_s]
    return {f"{prefix}p50_ms": pct(ms, 50), f"{prefix}p95_ms": pct(ms, 95), f"{prefix}p99_ms": pct(ms, 99),
            f"{prefix}max_ms": max(ms) if ms else float("nan")}


def summarise(peer: str, run: int, obs: Observed, raw: dict[str, float] | None, state: Path | None = None) -> Sample:
    keys = [k for k in obs.expected if k in obs.committed and k in obs.closed]
    latencies = [obs.committed[k] - obs.closed[k] for k in keys]
    per_file, detail = request_summary(obs.requests, len(obs.expected))
    wall = max(obs.closed.values(), default=obs.t0) - obs.t0
    sample = Sample(peer=peer, run=run, requests=obs.requests, finished=obs.finished)
    sample.metrics = {
        **latency_metrics(latencies), "arrived": len(keys), "files": len(obs.expected),
        "requests_per_file": per_file, "requests": sum(obs.requests.values()),
        "cpu_s_per_1000": obs.cpu_s * 1000 / max(len(keys), 1),
        "cpu_pct": 100 * obs.cpu_s / wall if wall > 0 else float("nan"),
        "peak_rss_mb": max(obs.peak_rss, obs.peak_hwm) / 2**20, "background_cores": obs.background_cores,
        **integrity(obs),
    }
    if raw:
        excess = [obs.committed[k] - obs.closed[k] - raw[k] for k in keys if k in raw]
        sample.metrics["excess_p99_ms"] = pct([x * 1000 for x in excess], 99)
    stage_note = ""
    if peer == "sidecar" and state is not None:
        stage_metrics, stage_note = stages.breakdown(state, obs.closed, obs.committed, pct)
        sample.metrics.update(stage_metrics)
    if not obs.finished:
        sample.note = f"DNF ({obs.stop_reason}): {len(keys)}/{len(obs.expected)} files arrived"
    sample.note = "; ".join(x for x in (sample.note, detail, stage_note) if x)
    return sample


def raw_put(ctx: Ctx, run: int, files: list[tuple[str, int]], pool: bytes) -> tuple[Sample, dict[str, float]]:
    """PUT the same files one at a time (one warm boto3 client, no concurrency): the floor for latency."""
    src = fresh_dir(ctx.work / "steady-raw")
    stream(src, files, pool, {}, {}, rate=0)
    bucket = ctx.server.new_bucket(f"steady-raw-{run}")
    obs = measure_ceiling(ctx, src, bucket, "put", threads=1, cap_s=300)
    times = {k: float(v) for k, v in obs.closed.items()}  # boto3_pool reports per-file seconds there
    sample = Sample(peer="raw-put", run=run, requests=obs.requests)
    sample.metrics = {**latency_metrics(list(times.values())), "files": len(files),
                      "requests_per_file": request_summary(obs.requests, len(files))[0]}
    ctx.server.drop_bucket(bucket)
    return sample, times


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    seconds = 60.0  # 240 files: a p99 over fewer files is the second-largest latency, not a percentile
    drain = 20.0 if ctx.quick else 45.0
    samples = []
    for r in range(runs):
        files = plan(r, seconds)
        pool = os.urandom(MAX_SIZE + len(files) * 13)
        raw_sample, raw = raw_put(ctx, r, files, pool)
        log(NAME, raw_sample)
        samples.append(raw_sample)
        for peer in peers:
            bucket = ctx.server.new_bucket(f"steady-{peer}-{r}")
            watch = fresh_dir(ctx.work / "watch")
            state = fresh_dir(ctx.work / "state" / bucket)
            obs = measure_watcher(
                ctx, peer, bucket, watch, state,
                writer=lambda exp, clo, w=watch, f=files, p=pool: stream(w, f, p, exp, clo),
                cap_s=seconds + drain, poll_s=0.25,
            )
            sample = summarise(peer, r, obs, raw, state)
            log(NAME, sample)
            samples.append(sample)
            ctx.server.drop_bucket(bucket)
    return samples

