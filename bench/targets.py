"""Where the daemon stands against the targets of issue 14, read off the aggregated numbers (not asserted)."""

from __future__ import annotations

import math

from report import CEILINGS, Agg, best, num

Aggs = dict[str, dict[str, Agg]]  # workload -> peer -> Agg


def _get(aggs: Aggs, workload: str, peer: str, key: str) -> float:
    agg = aggs.get(workload, {}).get(peer)
    return agg.median(key) if agg else float("nan")


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "**misses**")


def check(measured: float, limit: float, how: str) -> bool | None:
    if math.isnan(measured) or math.isnan(limit):
        return None
    return {"≤": measured <= limit, "≥": measured >= limit, "=": abs(measured - limit) < 5e-4}[how]


def rows(aggs: Aggs) -> list[list[str]]:
    out: list[list[str]] = []

    def add(  # noqa: PLR0917 - one table row per call reads best positionally
        target: str, measured: float, how: str, limit: float, digits: int, unit: str = "", detail: str = ""
    ) -> None:
        out.append([target, f"{num(measured, digits)} {unit}".strip(),
                    f"{how} {num(limit, digits)} {unit}".strip() + (f" ({detail})" if detail else ""),
                    verdict(check(measured, limit, how))])

    burst = aggs.get("burst", {})
    # 1. latency: the stream against raw PUTs of the same files, in the same run
    # The daemon's span ends when its journal marks the file stored (a raw PUT's ends at its response); runs
    # without the stage breakdown fall back to the object's commit time.
    sp50, sp99 = (_get(aggs, "steady", "sidecar", k) for k in ("stage_stored_p50_ms", "stage_stored_p99_ms"))
    if math.isnan(sp50):
        sp50, sp99 = _get(aggs, "steady", "sidecar", "p50_ms"), _get(aggs, "steady", "sidecar", "p99_ms")
    add("1. steady p50 close → known stored ≤ raw PUT p50 + 25 ms", sp50, "≤",
        _get(aggs, "steady", "raw-put", "p50_ms") + 25, 0, "ms")
    add("1. steady p99 close → known stored ≤ raw PUT p99 + 100 ms", sp99, "≤",
        _get(aggs, "steady", "raw-put", "p99_ms") + 100, 0, "ms")
    add("1. steady: exactly 1 request per file", _get(aggs, "steady", "sidecar", "requests_per_file"), "=", 1.0, 3)
    torn_by = [_get(aggs, w, "sidecar", "bytes_mismatched") for w in ("steady", "burst")
               if "sidecar" in aggs.get(w, {})]
    torn_by += [_get(aggs, "writers", p, "bytes_mismatched") for p in aggs.get("writers", {})]
    add("1. objects differing from their file (steady, burst, writers)", sum(torn_by) if torn_by else math.nan,
        "=", 0, 0)
    writers = aggs.get("writers", {})
    redo = sum(_get(aggs, "writers", p, "reuploads") + _get(aggs, "writers", p, "extra_keys") for p in writers)
    add("1. re-uploads + variant keys, ComfyUI's writers", redo if writers else math.nan, "=", 0, 0)
    # 2. CPU and throughput in the burst
    cpu = _get(aggs, "burst", "sidecar", "cpu_s_per_1000")
    add("2. burst CPU per file ≤ knowledgeable rclone loop", cpu, "≤", _get(aggs, "burst", "rclone-smart",
        "cpu_s_per_1000"), 2, "CPU s/1000")
    fps = _get(aggs, "burst", "sidecar", "files_per_s")
    add("2. burst files/s ≥ 0.9 x best ceiling (boto3 x8, the daemon's own PUT path x8)", fps, "≥",
        0.9 * best(burst, CEILINGS, "files_per_s"), 0, "files/s")
    add("2. burst: exactly 1 request per file", _get(aggs, "burst", "sidecar", "requests_per_file"), "=", 1.0, 3)
    # 3. large files
    add("3. large file MiB/s ≥ 0.9 x boto3 upload_file (8 threads)", _get(aggs, "large", "sidecar", "mib_per_s"),
        "≥", 0.9 * _get(aggs, "large", "boto3", "mib_per_s"), 0, "MiB/s")
    # 4. memory
    add("4. peak RSS, 4 workers uploading 60 MB files", _get(aggs, "memory", "sidecar/4x60MB", "peak_rss_mb"), "≤",
        120, 0, "MB")
    add("4. RSS flat over a 20,000-file stream (last wave - first)", _get(aggs, "memory", "sidecar/stream",
        "rss_growth_mb"), "≤", 5.0, 1, "MB")
    # 5. scale
    add("5. restart over 1,000,000 uploaded files", _get(aggs, "million", "sidecar", "seconds"), "≤", 15, 1, "s")
    add("5. ... requests", _get(aggs, "million", "sidecar", "requests"), "=", 0, 0, "requests")
    add("5. ... peak RSS", _get(aggs, "million", "sidecar", "peak_rss_mb"), "≤", 150, 0, "MB")
    # 6. the real cost per ComfyUI PNG
    add("6. CPU per 2.6 MB PNG ≤ 1.3 x the floor (one MD5 pass + one send)",
        _get(aggs, "writers", "sidecar/pil", "cpu_x_floor"), "≤", 1.3, 2, "x")
    # kept from issue 6
    add("cold start (10,000 / 100,000 files): 0 requests", _get(aggs, "cold", "sidecar", "requests"), "=", 0, 0,
        "requests")
    add("idle CPU ≤ 0.5 % of a core (over a populated tree)", _get(aggs, "idle", "sidecar", "cpu_pct"), "≤", 0.5, 2,
        "%")
    add("idle RSS ≤ 80 MB", _get(aggs, "idle", "sidecar", "rss_mb"), "≤", 80, 1, "MB")
    return out
