"""Where the daemon stands against the targets of issue 6, read off the aggregated numbers (not asserted)."""

from __future__ import annotations

import math

from report import RCLONES, Agg, best, num

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
    fps = _get(aggs, "burst", "sidecar", "files_per_s")
    add("burst files/s ≥ best rclone", fps, "≥", best(burst, RCLONES, "files_per_s"), 0, "files/s")
    add("burst files/s ≥ 0.9 x raw boto3", fps, "≥", 0.9 * _get(aggs, "burst", "boto3", "files_per_s"), 0,
        "files/s")
    same_form = _get(aggs, "burst", "boto3-md5", "files_per_s")
    if not math.isnan(same_form):
        out.append(["(info) burst files/s vs raw boto3 in the daemon's own request form (Content-MD5)",
                     f"{num(fps, 0)} files/s", f"{num(same_form, 0)} files/s = {fps / same_form:.2f}x", "info"])
    cpu = _get(aggs, "burst", "sidecar", "cpu_s_per_1000")
    add("CPU per file ≤ rclone's (burst)", cpu, "≤", best(burst, RCLONES, "cpu_s_per_1000", min), 2, "CPU s/1000")
    per_process = _get(aggs, "burst", "inotify", "cpu_s_per_1000")
    if math.isinf(per_process) or math.isnan(per_process):  # no file arrived in the burst: use the stream
        add("CPU per file ≥ 3x better than one process per file (steady stream)",
            _get(aggs, "steady", "sidecar", "cpu_s_per_1000"), "≤",
            _get(aggs, "steady", "inotify", "cpu_s_per_1000") / 3, 1, "CPU s/1000",
            "⅓ of the per-file processes'; in the burst they delivered nothing")
    else:
        add("CPU per file ≥ 3x better than one process per file (burst)", cpu, "≤", per_process / 3, 2,
            "CPU s/1000", "⅓ of the per-file processes'")
    add("burst: exactly 1 request per file", _get(aggs, "burst", "sidecar", "requests_per_file"), "=", 1.0, 3)
    add("steady: exactly 1 request per file", _get(aggs, "steady", "sidecar", "requests_per_file"), "=", 1.0, 3)
    add("cold start: 0 requests", _get(aggs, "cold", "sidecar", "requests"), "=", 0, 0, "requests")
    raw = _get(aggs, "steady", "raw-put", "p99_ms")
    add("steady p99 ≤ raw PUT p99 + 250 ms", _get(aggs, "steady", "sidecar", "p99_ms"), "≤", raw + 250, 0, "ms")
    add("steady p99 of per-file (latency - raw PUT) ≤ 250 ms", _get(aggs, "steady", "sidecar", "excess_p99_ms"),
        "≤", 250, 0, "ms")
    add("idle CPU ≤ 0.5 % of a core", _get(aggs, "idle", "sidecar", "cpu_pct"), "≤", 0.5, 2, "%")
    add("idle RSS ≤ 80 MB", _get(aggs, "idle", "sidecar", "rss_mb"), "≤", 80, 1, "MB")
    add("idle RSS flat (growth over the window)", _get(aggs, "idle", "sidecar", "rss_growth_mb"), "≤", 1.0, 2,
        "MB")
    add("RSS ≤ 80 MB after uploading the big tree", _get(aggs, "cold", "sidecar-initial-upload", "rss_mb"), "≤",
        80, 1, "MB")
    add("RSS ≤ 80 MB after reconciling the big tree", _get(aggs, "cold", "sidecar", "rss_mb"), "≤", 80, 1, "MB")
    return out
