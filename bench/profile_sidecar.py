#!/usr/bin/env python3
"""Profile the daemon under one bench workload with py-spy, and print where its CPU goes.

    python bench/profile_sidecar.py burst  [--files 3000] [--workers 8]
    python bench/profile_sidecar.py steady [--seconds 20]
    python bench/profile_sidecar.py large  [--mib 512]
    python bench/profile_sidecar.py pil                  # 60 PNGs of 2.6 MB written as PIL does, 4 a second

Starts localbucket and the daemon exactly as bench/run.py does, attaches ``py-spy record`` (installed by
``bash bench/setup.sh --profilers``), runs the workload, then prints the functions with the most samples
(inclusive and self) and writes the raw collapsed stacks and an SVG flame graph next to the results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import contenders  # noqa: E402
import proctree  # noqa: E402
import wl_burst  # noqa: E402
import wl_large  # noqa: E402
import wl_steady  # noqa: E402
import wl_writers  # noqa: E402
from harness import fresh_dir  # noqa: E402
from lbserver import LocalBucket  # noqa: E402

AREAS = [  # first match wins, tested against the whole stack
    ("the S3 request itself (direct_put, sigv4, http.client; botocore)",
     ("botocore/", "urllib3/", "http/client", "sidecar/direct_put.py", "sidecar/sigv4.py")),
    ("logging (structlog + stdlib bridge)", ("structlog/", "logging/", "sidecar/logs.py")),
    ("journal (SQLite)", ("sidecar/journal.py",)),
    ("settle (stability check)", ("sidecar/settle.py",)),
    ("watcher (watchdog)", ("watchdog/", "sidecar/watcher.py")),
    ("tenacity (retry wrapper)", ("tenacity/",)),
    ("metrics", ("prometheus_client/", "sidecar/metrics.py")),
    ("transfer, keys, localfile (per-file work)", ("sidecar/transfer.py", "sidecar/keys.py",
                                                   "sidecar/localfile.py")),
    ("uploader (dispatch, bookkeeping)", ("sidecar/uploader.py",)),
    ("daemon", ("sidecar/daemon.py",)),
]


def area_of(stack: str) -> str:
    for name, needles in AREAS:
        if any(n in stack for n in needles):
            return name
    return "other"


def summarize(collapsed: Path, top: int = 25) -> str:
    """Top functions by inclusive and by self samples from py-spy's collapsed ("raw") output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        areas[area_of(stack)] += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for f in stack.split(";")[1:]]  # first frame is the thread / process name
        for f in set(frames):
            inclusive[f] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples (threads that were not idle)", "", "by area:"]
    lines += [f"  {100 * n / total:5.1f}%  {a}" for a, n in areas.most_common()]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=["burst", "steady", "large", "pil"])
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (Python CPU)")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "profile")
    args = p.parse_args()
    pyspy = shutil.which("py-spy")
    if not pyspy:
        sys.exit("py-spy missing: bash bench/setup.sh --profilers")
    work = Path(tempfile.mkdtemp(prefix="sidecar-profile-", dir="/var/tmp"))
    server = LocalBucket(work)
    server.start()
    try:
        ctx = contenders.Ctx(repo=BENCH.parent, bench=BENCH, work=work, server=server, quick=True,
                             aws="", rclone="", inotifywait="")
        bucket = server.new_bucket(f"profile-{args.workload}")
        watch = fresh_dir(work / "watch")
        running = contenders.start_watcher(ctx, "sidecar", watch, bucket, fresh_dir(work / "state"),
                                           workers=args.workers)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        raw = args.out.with_name(f"{args.out.name}-{args.workload}{'-gil' if args.gil else ''}.txt")
        spy = subprocess.Popen([pyspy, "record", "--pid", str(running.pid), "--rate", str(args.rate),
                                "--format", "raw", "--output", str(raw), "--nonblocking",
                                *(["--gil"] if args.gil else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        cpu0, t0 = running.cpu_s(), time.time()
        expected: dict[str, int] = {}
        closed: dict[str, float] = {}
        if args.workload == "burst":
            wl_burst.FILES = args.files
            wl_burst.write_all(watch, os.urandom(wl_burst.SIZE + args.files * 7), expected, closed)
        elif args.workload == "steady":
            files = wl_steady.plan(0, args.seconds)
            pool = os.urandom(wl_steady.MAX_SIZE + len(files) * 13)
            wl_steady.stream(watch, files, pool, expected, closed)
        elif args.workload == "pil":
            wl_writers.write_shape("pil", watch, os.urandom(wl_writers.PNG_SIZE + wl_writers.PER_SHAPE * 31),
                                   expected, closed)
        else:
            wl_large.write_big(watch, args.mib * 2**20, os.urandom(wl_large.BLOCK), expected, closed)
        proctree.wait_until(lambda: server.arrived(bucket, expected)[0] == len(expected), 300, 0.1)
        cpu = running.cpu_s() - cpu0
        _, times = server.arrived(bucket, expected)
        headline = (f"{args.workload}: {len(times)}/{len(expected)} files in {max(times.values()) - t0:.2f} s, "
                    f"daemon CPU {cpu:.2f} s, requests {dict(server.requests(bucket))}"
                    f"{' (GIL holder only)' if args.gil else ''}")
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        running.stop()
        summary = f"{headline}\n\n{summarize(raw)}"
        raw.with_suffix(".summary.txt").write_text(summary + "\n")
        print(summary)
        print(f"\ncollapsed stacks: {raw}  (flamegraph.pl or speedscope.app read them)")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
