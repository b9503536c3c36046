"""Where the daemon's latency goes: close → committed split into stages, read after the run (no request).

The writer knows when it closed a file, the server's data directory when the object was committed; the
daemon's journal (read after it stopped) and its JSON log say what happened in between:

- ``detect``  close → recorded as finished (``discovered_at``): the inotify event, watchdog's dispatch,
  the writer check or the stability wait (see the decision table in docs/), the journal insert;
- ``queue``   recorded → upload started (``uploaded_at`` minus the attempt's ``duration_s``): the dispatcher's
  claim and the hand-off to a worker (and any earlier attempt: a retry shows up here);
- ``send``    upload started → object committed: open, read + MD5, the request, the server's write;
- ``confirm`` committed → journal marked uploaded: the server's own finishing after its last write (the
  object file's mtime is its last write, not its rename: hashing, rename, response), the ETag proof, the
  journal write.

``stored`` is the whole span, close → journal marked: when the daemon knows the file is safe (what
``sidecar wait`` and a job's completion wait for). It is the daemon's figure to hold against a raw PUT's
duration, which also ends at the response; the object's mtime ends a few ms earlier.

``how`` counts the rows by what confirmed them (``source``: close, create, move, scan).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

STAGES = ("detect", "queue", "send", "confirm", "stored")


def _attempts(log: Path) -> dict[str, float]:
    """path -> duration_s of its last successful attempt, from the daemon's JSON log."""
    out: dict[str, float] = {}
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        if '"upload_succeeded"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "upload_succeeded" and "duration_s" in event:
            out[str(event["path"])] = float(event["duration_s"])
    return out


def breakdown(state: Path, closed: dict[str, float], committed: dict[str, float],
              pct: Callable[[list[float], float], float]) -> tuple[dict[str, float], str]:
    """Per-stage p50/p99 in ms as metrics (``stage_detect_p50_ms``, ...) and a note of the sources."""
    journal = state / "sidecar-state" / "journal.sqlite3"
    if not journal.exists():
        return {}, ""
    durations = _attempts(state / "sidecar.log")
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT path, source, discovered_at, uploaded_at FROM files WHERE uploaded_at IS NOT NULL")
        found = [(bytes(p).decode(errors="replace"), str(src), float(rec), float(up)) for p, src, rec, up in rows]
    finally:
        db.close()
    spans: dict[str, list[float]] = {s: [] for s in STAGES}
    how: Counter[str] = Counter()
    for key, source, recorded, marked in found:
        if key not in closed or key not in committed or key not in durations:
            continue
        how[source] += 1
        started = marked - durations[key]
        for stage, a, b in (("detect", closed[key], recorded), ("queue", recorded, started),
                            ("send", started, committed[key]), ("confirm", committed[key], marked),
                            ("stored", closed[key], marked)):
            spans[stage].append((b - a) * 1000)
    metrics: dict[str, float] = {}
    for stage, values in spans.items():
        if values:
            metrics[f"stage_{stage}_p50_ms"] = pct(values, 50)
            metrics[f"stage_{stage}_p99_ms"] = pct(values, 99)
    return metrics, "confirmed by " + ", ".join(f"{src} {n}" for src, n in how.most_common()) if how else ""
