"""The HTTP port under a connection flood: 500 slowloris heads and 50 oversized-header clients for 60 s.

A stranger on the pod's public port must not be able to stop uploads, blind the liveness probe or make the
daemon's memory grow without bound. The daemon runs for real (``sidecar run`` against the moto server behind
the strict proxy) while a writer keeps producing files; the figures are printed and appended to the CI
report.
"""

from __future__ import annotations

import os
import re
import resource
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.container import report
from support.e2e import World
from support.flood import Flood
from support.waiting import wait_until

SLOW, BIG, SECONDS = 500, 50, 60.0
TOKEN = "flood-test-token-0123456789"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = pytest.mark.slow


def _rss_bytes(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), flags=re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def _healthz(port: int) -> tuple[int, float]:
    started = time.monotonic()
    try:
        with OPENER.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
    except OSError:
        status = 0  # no answer within 5 s, or refused
    return status, time.monotonic() - started


def _cuts(world: World, port: int) -> float:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with OPENER.open(req, timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^sidecar_http_connections_cut_total (\S+)$", text, flags=re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_uploads_and_healthz_survive_a_connection_flood(world: World) -> None:
    """Under 500 slow + 50 big-header connections for 60 s: every /healthz probe is answered 200, a file
    written every 0.25 s reaches the bucket byte-identical in every 10 s window, trickling heads are cut
    at their deadline, and the daemon's RSS stays within 64 MiB of its level before the flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * (SLOW + BIG) + 512  # the flood's sockets here, and the daemon's (it raises its own limit)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard descriptor limit ({hard}) is below the {need} this flood needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    proc = world.start(http_token=TOKEN)
    port = int(proc.events("http_started")[0]["port"])
    assert proc.pid is not None
    baseline = _rss_bytes(proc.pid)

    written: list[tuple[float, str]] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.wait(0.25):
            rel = world.remember(f"flood/img_{n:04d}.png", os.urandom(16 * 1024) + n.to_bytes(4, "big"))
            world.path(rel).parent.mkdir(parents=True, exist_ok=True)
            world.path(rel).write_bytes(world.written[rel])
            written.append((time.monotonic(), rel))
            n += 1

    flood = Flood(port, slow=SLOW, big=BIG).start()
    wait_until(lambda: flood.open_now()["slow"] >= SLOW, timeout=20, message=lambda: str(flood.open_now()))
    writing = threading.Thread(target=writer, daemon=True)
    writing.start()
    probes: list[tuple[int, float]] = []
    rss: list[int] = []
    in_bucket_at: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < SECONDS:
            probes.append(_healthz(port))
            rss.append(_rss_bytes(proc.pid))
            in_bucket_at.append((time.monotonic() - started, len(world.bucket_keys())))
            time.sleep(0.5)  # the probe's own cadence, like a kubelet's period; not a wait for a condition
        open_at_end = flood.open_now()
    finally:
        stop.set()
        writing.join(5)
        counts = flood.stop()
    world.wait_in_bucket([rel for _, rel in written], proc, timeout=60)
    cut = _cuts(world, port)

    growth = []  # objects that reached the bucket in each 10 s window of the flood
    for start in range(0, int(SECONDS), 10):
        inside = [count for at, count in in_bucket_at if start <= at < start + 10]
        growth.append(inside[-1] - inside[0] if inside else 0)
    latencies = sorted(latency for status, latency in probes if status == 200)
    figures = {
        "slow": SLOW, "big": BIG, "seconds": SECONDS, "open_at_end": open_at_end,
        "opened": counts.opened, "ended_by_server": counts.ended_by_server, "cut_by_deadline": cut,
        "healthz_probes": len(probes), "healthz_ok": len(latencies),
        "healthz_p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "healthz_max_ms": round(1000 * latencies[-1], 1) if latencies else None,
        "files_written": len(written), "files_per_10s_window": growth,
        "rss_before_mib": round(baseline / 2**20, 1), "rss_peak_mib": round(max(rss) / 2**20, 1),
    }
    report("http_flood", **figures)
    assert [status for status, _ in probes if status != 200] == [], figures
    assert len(probes) >= 60, figures
    assert open_at_end["slow"] >= SLOW * 0.9 and open_at_end["big"] >= 1, figures
    assert counts.ended_by_server["slow"] >= SLOW, "trickling heads must be cut at their total deadline"
    assert cut >= SLOW
    assert counts.ended_by_server["big"] >= BIG, "oversized heads are refused, not buffered"
    assert growth and all(g > 0 for g in growth), f"uploads stalled in a window: {figures}"
    assert world.bucket_diff(world.expected()) == []
    assert max(rss) - baseline < 64 * 2**20, figures
