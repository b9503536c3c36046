"""Turning samples into tables: medians with their spread, ratios, and where the daemon stands."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from contenders import PEERS
from harness import Sample

LABELS = {**{k: p.label for k, p in PEERS.items()}, "raw-put": "raw PUT, one at a time (boto3)",
          "sidecar-initial-upload": "sidecar, first upload of the tree (to fill its journal)"}
RCLONES = ("rclone", "rclone-fast", "rclone-smart")
CEILINGS = ("boto3", "sidecar-store")


@dataclass
class Agg:
    """One tool on one workload over all runs."""

    peer: str
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs: int = 0
    finished: int = 0

    def median(self, key: str) -> float:
        vals = [v for v in self.values.get(key, []) if not math.isnan(v)]
        return statistics.median(vals) if vals else float("nan")

    def has(self, key: str) -> bool:
        return any(not math.isnan(v) and not math.isinf(v) for v in self.values.get(key, []))

    def cell(self, key: str, digits: int = 0, dnf: bool = True) -> str:
        vals = [v for v in self.values.get(key, []) if not math.isnan(v)]
        if dnf and self.finished < self.runs and key in ("files_per_s", "seconds", "mib_per_s"):
            return "DNF" if not vals else f"{num(statistics.median(vals), digits)} ({self.finished}/{self.runs} runs)"
        if not vals:
            return "—"
        med, lo, hi = statistics.median(vals), min(vals), max(vals)
        if len(vals) == 1 or num(lo, digits) == num(hi, digits):
            return num(med, digits)
        return f"{num(med, digits)} ({num(lo, digits)}-{num(hi, digits)})"


def num(x: float, digits: int) -> str:
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:,.{digits}f}"


def ratio(a: float, b: float, digits: int = 2) -> str:
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b) or b == 0:
        return "—"
    return f"{a / b:.{digits}f}x"


def aggregate(samples: list[Sample]) -> dict[str, Agg]:
    out: dict[str, Agg] = {}
    for s in samples:
        agg = out.setdefault(s.peer, Agg(s.peer))
        agg.runs += 1
        agg.finished += int(s.finished)
        for k, v in s.metrics.items():
            agg.values.setdefault(k, []).append(float(v))
        if s.note and s.note not in agg.notes:
            agg.notes.append(s.note)
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def notes_cell(agg: Agg, limit: int = 2) -> str:
    notes = agg.notes[:limit] + ([f"(+{len(agg.notes) - limit} more)"] if len(agg.notes) > limit else [])
    return " / ".join(n[:260] for n in notes)


def best(aggs: dict[str, Agg], names: tuple[str, ...], key: str, pick=max) -> float:  # type: ignore[no-untyped-def]
    vals = [aggs[n].median(key) for n in names if n in aggs and not math.isnan(aggs[n].median(key))]
    return pick(vals) if vals else float("nan")


def checked_cell(a: Agg) -> str:
    """Byte checks: objects compared / differing / under keys no file has."""
    if not a.has("bytes_checked"):
        return "—"
    return f"{a.cell('bytes_checked')} / {a.cell('bytes_mismatched')} / {a.cell('extra_keys')}"


def burst_table(aggs: dict[str, Agg]) -> str:
    ceiling = best(aggs, CEILINGS, "files_per_s")
    rclone_fps = best(aggs, RCLONES, "files_per_s")
    rclone_cpu = best(aggs, RCLONES, "cpu_s_per_1000", min)
    rows = []
    for a in aggs.values():
        fps = a.median("files_per_s")
        rows.append([LABELS.get(a.peer, a.peer), a.cell("files_per_s"), a.cell("seconds", 2),
                     a.cell("cpu_s_per_1000", 2), a.cell("requests_per_file", 2), a.cell("peak_rss_mb"),
                     ratio(fps, ceiling), ratio(fps, rclone_fps), ratio(a.median("cpu_s_per_1000"), rclone_cpu),
                     checked_cell(a), a.cell("background_cores", 2), notes_cell(a)])
    return table(["tool", "files/s", "time s", "CPU s / 1000 files", "requests / file", "peak RSS MB",
                  "files/s x best ceiling", "files/s x best rclone", "CPU x cheapest rclone",
                  "bytes checked / differing / extra keys", "background load (cores)", "requests made, notes"], rows)


def steady_table(aggs: dict[str, Agg]) -> str:
    raw_p99 = aggs["raw-put"].median("p99_ms") if "raw-put" in aggs else float("nan")
    rows = []
    for a in aggs.values():
        over = a.median("p99_ms") - raw_p99 if a.peer != "raw-put" else float("nan")
        rows.append([LABELS.get(a.peer, a.peer), a.cell("p50_ms"), a.cell("p95_ms"), a.cell("p99_ms"),
                     a.cell("max_ms"), num(over, 0), a.cell("excess_p99_ms"), a.cell("requests_per_file", 2),
                     a.cell("cpu_s_per_1000", 1), a.cell("cpu_pct", 1), a.cell("peak_rss_mb"), checked_cell(a),
                     a.cell("background_cores", 2), notes_cell(a)])
    return table(["tool", "p50 ms", "p95 ms", "p99 ms", "max ms", "p99 - raw PUT p99, ms",
                  "p99 of (latency - raw PUT of the same file), ms", "requests / file", "CPU s / 1000 files",
                  "CPU % of a core", "peak RSS MB", "bytes checked / differing / extra keys",
                  "background load (cores)", "requests made, notes"], rows) + stage_table(aggs)


def stage_table(aggs: dict[str, Agg]) -> str:
    """The daemon's close → committed latency by stage (bench/stages.py), when the run measured it."""
    a = aggs.get("sidecar")
    if a is None or not a.has("stage_detect_p50_ms"):
        return ""
    what = {"detect": "close → recorded (event, writer check, journal insert)",
            "queue": "recorded → upload started (claim, hand-off to a worker)",
            "send": "started → committed (read + MD5, request, server write)",
            "confirm": "object's last byte written → journal marked (server's hashing, rename and response; "
                       "ETag proof; journal write)",
            "stored": "**close → journal marked: known stored** (the span a raw PUT's duration compares with)"}
    rows = [[what[s], a.cell(f"stage_{s}_p50_ms", 1), a.cell(f"stage_{s}_p99_ms", 1)] for s in what]
    return "\n\nWhere the daemon's latency goes (its journal and log, read after the run):\n\n" + table(
        ["stage", "p50 ms", "p99 ms"], rows)


def large_table(aggs: dict[str, Agg]) -> str:
    ceiling = aggs["boto3"].median("mib_per_s") if "boto3" in aggs else float("nan")
    label = {**LABELS, "boto3": "raw boto3 upload_file, 8 threads (ceiling)"}
    rows = [[label.get(a.peer, a.peer), a.cell("mib_per_s"), a.cell("seconds", 2),
             ratio(a.median("mib_per_s"), ceiling), a.cell("peak_rss_mb"), a.cell("cpu_s", 2),
             a.cell("requests"), checked_cell(a), a.cell("background_cores", 2), notes_cell(a)]
            for a in aggs.values()]
    return table(["tool", "MiB/s", "close → committed, s", "x ceiling", "peak RSS MB", "CPU s", "requests",
                  "bytes checked / differing / extra keys", "background load (cores)", "requests made, notes"], rows)


def cold_table(aggs: dict[str, Agg]) -> str:
    rows = []
    for a in aggs.values():
        if a.peer == "sidecar-initial-upload":
            rows.append([LABELS[a.peer], a.cell("seconds", 1) + f" ({a.cell('files_per_s')} files/s)",
                         a.cell("peak_rss_mb"), a.cell("rss_mb"), "—", a.cell("requests"), notes_cell(a)])
        else:
            rows.append([LABELS.get(a.peer, a.peer) + (" (restart → scan_completed)" if a.peer == "sidecar"
                                                       else " (one pass)"),
                         a.cell("seconds", 2), a.cell("peak_rss_mb"), a.cell("rss_mb"), a.cell("cpu_s", 2),
                         a.cell("requests"), notes_cell(a)])
    return table(["tool", "time s", "peak RSS MB", "RSS after, MB", "CPU s", "requests", "requests made, notes"],
                 rows)


def idle_table(aggs: dict[str, Agg]) -> str:
    rows = [[LABELS.get(a.peer, a.peer), a.cell("cpu_pct", 2), a.cell("rss_mb", 1),
             a.cell("rss_growth_mb", 2) if a.peer == "sidecar" else "—", a.cell("requests_per_min", 1),
             notes_cell(a)] for a in aggs.values()]
    return table(["tool", "CPU % of one core", "RSS MB", "RSS growth over the window, MB", "requests / min",
                  "requests made"], rows)


def writers_table(aggs: dict[str, Agg]) -> str:
    rows = [[a.peer, a.cell("files"), a.cell("requests_per_file", 2), a.cell("reuploads"), checked_cell(a),
             a.cell("p50_ms"), a.cell("p99_ms"), a.cell("max_ms"), a.cell("cpu_ms_per_file", 1),
             a.cell("floor_cpu_ms_per_file", 1), a.cell("cpu_x_floor", 2), notes_cell(a)] for a in aggs.values()]
    return table(["writer shape", "files", "requests / file", "re-uploads", "bytes checked / differing / extra keys",
                  "p50 ms", "p99 ms", "max ms", "daemon CPU ms / file", "floor CPU ms / file (MD5 + one send)",
                  "x floor", "requests made"], rows)


def memory_table(aggs: dict[str, Agg]) -> str:
    rows = []
    for a in aggs.values():
        if a.peer.endswith("/stream"):
            waves = " → ".join(a.cell(k, 1) for k in sorted(a.values) if k.startswith("rss_after_wave_"))
            rows.append([a.peer, f"{a.cell('arrived')} files; RSS after each 5,000: {waves} MB",
                         a.cell("rss_growth_mb", 1), "—", notes_cell(a)])
        else:
            rows.append([a.peer, a.cell("peak_rss_mb"), "—", a.cell("seconds", 2) + f" s; {checked_cell(a)}",
                         notes_cell(a)])
    return table(["tool / case", "peak RSS MB (4x60MB) or RSS per wave", "RSS growth MB",
                  "time; bytes checked / differing / extra keys", "requests made"], rows)


def million_table(aggs: dict[str, Agg]) -> str:
    rows = [[LABELS.get(a.peer, a.peer), a.cell("seconds", 2), a.cell("requests"), a.cell("peak_rss_mb"),
             a.cell("cpu_s", 2), a.cell("journal_bytes_per_file"), a.cell("scrape_s", 3),
             f"{a.cell('probe_p50_ms')} / {a.cell('probe_max_ms')}",
             f"{a.cell('scraped_p50_ms')} / {a.cell('scraped_max_ms')} ({a.cell('scrapes_during_probe')} scrapes)",
             notes_cell(a, 1)] for a in aggs.values()]
    return table(["tool", "restart → scan_completed, s", "requests", "peak RSS MB", "CPU s", "journal bytes / file",
                  "/metrics scrape s", "new files p50 / max ms, no scraper", "new files p50 / max ms, scraper looping",
                  "notes"], rows)


TABLES = {"burst": burst_table, "steady": steady_table, "large": large_table, "cold": cold_table,
          "idle": idle_table, "writers": writers_table, "memory": memory_table, "million": million_table}


def summary_table(aggs: dict[str, dict[str, Agg]]) -> str:
    """One row per tool, the headline figure of each workload (medians)."""
    def get(workload: str, peer: str) -> Agg:
        return aggs.get(workload, {}).get(peer) or Agg(peer)

    order = ["boto3", "boto3-md5", "sidecar-store", "raw-put", "sidecar", "rclone", "rclone-fast", "rclone-smart",
             "aws-cp", "aws-sync", "inotify"]
    peers = [p for p in order if any(p in a for a in aggs.values())]
    rows = []
    for p in peers:
        b, s, lg, c, i = (get(w, p) for w in ("burst", "steady", "large", "cold", "idle"))
        cold = f"{c.cell('seconds', 1)} s, {c.cell('requests')} req" if c.values else "—"
        idle = f"{i.cell('cpu_pct', 2)} %, {i.cell('rss_mb')} MB" if i.values else "—"
        rows.append([LABELS.get(p, p), b.cell("files_per_s"), b.cell("cpu_s_per_1000", 2),
                     b.cell("requests_per_file", 2), s.cell("p99_ms"), s.cell("requests_per_file", 2),
                     lg.cell("mib_per_s"), cold, idle])
    return table(["tool", "burst files/s", "burst CPU s/1000 files", "burst req/file", "steady p99 ms",
                  "steady req/file", "large MiB/s", "cold start (time, requests)", "idle (CPU of a core, RSS)"],
                 rows)
