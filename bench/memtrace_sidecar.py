#!/usr/bin/env python3
"""Where the daemon's memory goes while it uploads a big tree: tracemalloc snapshots of a real run.

    python bench/memtrace_sidecar.py [--files 30000] [--every 5]

Writes a tree of 1 KiB files (like workload 4), starts localbucket, then runs ``sidecar run`` *in this
process* under tracemalloc (the daemon's own code, from this work tree, same settings as bench/run.py),
and prints RSS and the allocation sites holding the most memory every few seconds and at the end.
tracemalloc slows the daemon down several times: read the sizes, not the times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import contenders  # noqa: E402
import proctree  # noqa: E402
import wl_cold  # noqa: E402
from harness import fresh_dir  # noqa: E402
from lbserver import LocalBucket  # noqa: E402

from sidecar.cli import main as sidecar_main  # noqa: E402 - the daemon's own entry point, run in this process


def report(label: str, top: int) -> str:
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snap.statistics("lineno")
    traced, peak = tracemalloc.get_traced_memory()
    rss = proctree.vm_hwm(os.getpid(), "VmRSS") / 2**20
    lines = [f"--- {label}: RSS {rss:.1f} MB, traced {traced / 2**20:.1f} MB (peak {peak / 2**20:.1f} MB)"]
    for s in stats[:top]:
        frame = s.traceback[0]
        lines.append(f"  {s.size / 2**20:7.2f} MB {s.count:8d} blocks  {frame.filename}:{frame.lineno}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=30_000)
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidecar-memtrace-", dir="/var/tmp"))
    server = LocalBucket(work)
    cleaned = threading.Lock()

    def cleanup() -> None:
        if cleaned.acquire(blocking=False):
            server.stop()
            shutil.rmtree(work, ignore_errors=True)

    server.start()
    try:
        tree = fresh_dir(work / "tree")
        expected = wl_cold.write_tree(tree, args.files)
        ctx = contenders.Ctx(repo=BENCH.parent, bench=BENCH, work=work, server=server, quick=True)
        bucket = server.new_bucket("memtrace")
        os.environ.update(contenders.sidecar_env(ctx, tree, bucket, fresh_dir(work / "state"),
                                                 workers=args.workers))
        os.environ["SIDECAR_LOG_LEVEL"] = "WARNING"
        tracemalloc.start(1)
        print(report("before start", args.top), flush=True)
        done = threading.Event()

        def watch() -> None:
            t0 = time.monotonic()
            while not done.is_set():
                done.wait(args.every)
                arrived = server.requests(bucket)["PUT"]
                print(report(f"{time.monotonic() - t0:.0f} s, {arrived}/{len(expected)} uploaded", args.top),
                      flush=True)
                if arrived >= len(expected):
                    time.sleep(2)
                    print(report("all uploaded (+2 s)", args.top), flush=True)
                    cleanup()  # the daemon may leave with os._exit, skipping the finally below
                    os.kill(os.getpid(), 15)  # the daemon's own SIGTERM handling stops it
                    return

        threading.Thread(target=watch, daemon=True).start()
        code = sidecar_main(["run"])
        done.set()
        return int(code or 0)
    finally:
        cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
