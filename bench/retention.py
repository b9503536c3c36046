#!/usr/bin/env python3
"""Retention benchmark: a long ComfyUI-like stream into a disk of fixed size, with a deletion policy.

    python bench/retention.py [--seconds 60] [--disk-mib 256] [--rate 4]

Each tool gets a fresh tmpfs of ``--disk-mib`` as its watched folder and the same stream (0.5-3 MB PNG-like
files at ``--rate`` per second, written in place in 8 chunks), several times the disk's size in all:

  sidecar      the daemon with SIDECAR_DISK_MIN_FREE=25% (deletes verified files, oldest upload first)
  rclone-move  `rclone move --min-age 2s --transfers 8` in a `while true; ...; sleep 1` loop, the usual
               "upload and free the disk" answer (it deletes each file after its own upload check)

Measured: bytes used on the disk over time (bench/results/retention-latest.svg), failed writes (ENOSPC),
files deleted and deletions per second, the tool's CPU seconds, and an audit of every file: on disk with
its bytes, or in the bucket with its bytes (anything else is lost or torn). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import contenders  # noqa: E402
from lbserver import LocalBucket  # noqa: E402

CHUNKS, PAUSE_S = 8, 0.02
MIN_SIZE, MAX_SIZE = 500_000, 3_000_000
PEERS = ("sidecar", "rclone-move")


def stream(folder: Path, seconds: float, rate: float, written: dict[str, bytes], failed: list[str]) -> None:
    rng = random.Random(7)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        name = f"ComfyUI_{n + 1:05d}_.png"
        data = rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE))
        step = -(-len(data) // CHUNKS)
        try:
            with open(folder / name, "wb") as out:
                for at in range(0, len(data), step):
                    if at:
                        out.flush()
                        time.sleep(PAUSE_S)
                    out.write(data[at : at + step])
            written[name] = data
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            failed.append(name)
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()  # a failed save leaves nothing behind
        n += 1


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def run_peer(ctx: contenders.Ctx, peer: str, args: argparse.Namespace) -> dict[str, object]:
    base = ctx.work / peer
    watch = base / "out"
    watch.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.disk_mib}m", f"bench-{peer}", str(watch)], check=True)
    bucket = ctx.server.new_bucket(f"retention-{peer}")
    try:
        if peer == "sidecar":
            ctx.sidecar_env = {"SIDECAR_DISK_MIN_FREE": "25%", "SIDECAR_LOG_LEVEL": "INFO"}
            running = contenders.start_watcher(ctx, "sidecar", watch, bucket, base)
        else:
            env = {**ctx.base_env(), "BENCH_BUCKET": bucket, "BENCH_WATCH_DIR": str(watch)}
            loop = (f"while true; do {ctx.rclone} move {watch} bench:{bucket} --min-age 2s --transfers 8 -q "
                    "--no-update-modtime; sleep 1; done")
            popen = subprocess.Popen(["bash", "-c", loop], env=env, stdin=subprocess.DEVNULL,
                                     stdout=(base / "rclone.log").open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
            running = contenders.Running(peer, popen, base / "rclone.log")
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.wait(0.5):
                samples.append((time.monotonic() - t0, used_bytes(watch)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        written: dict[str, bytes] = {}
        failed: list[str] = []
        cpu0 = running.cpu_s()
        stream(watch, args.seconds, args.rate, written, failed)
        time.sleep(args.drain)  # the tail of the stream gets its upload (and deletion) window
        cpu = running.cpu_s() - cpu0
        stop.set()
        sampler.join()
        running.stop()
        return summarise(peer, ctx, bucket=bucket, watch=watch, written=written, failed=failed, samples=samples,
                         cpu=cpu, args=args)
    finally:
        subprocess.run(["umount", "-l", str(watch)], check=False)
        ctx.server.drop_bucket(bucket)


def summarise(peer: str, ctx: contenders.Ctx, *, bucket: str, watch: Path, written: dict[str, bytes],
              failed: list[str], samples: list[tuple[float, int]], cpu: float,
              args: argparse.Namespace) -> dict[str, object]:
    lost, torn, deleted = [], [], 0
    for name, data in written.items():
        local = watch / name
        stored = ctx.server.bucket_dir(bucket) / name
        in_bucket = stored.read_bytes() if stored.exists() else None
        if in_bucket is not None and in_bucket != data:
            torn.append(name)
        if not local.exists():
            deleted += 1
            if in_bucket != data:
                lost.append(name)
    used = [u for _, u in samples]
    return {
        "peer": peer, "files_written": len(written), "writes_failed_enospc": len(failed),
        "bytes_written_mib": round(sum(map(len, written.values())) / 2**20, 1),
        "deleted": deleted, "lost": len(lost), "torn_objects": len(torn),
        "deletions_per_s": round(deleted / max(args.seconds + args.drain, 1e-9), 2),
        "peak_used_mib": round(max(used, default=0) / 2**20, 1),
        "final_used_mib": round((used[-1] if used else 0) / 2**20, 1),
        "disk_mib": args.disk_mib, "cpu_s": round(cpu, 2),
        "cpu_s_per_1000_files": round(1000 * cpu / max(len(written), 1), 2),
        "series": [(round(t, 2), round(u / 2**20, 2)) for t, u in samples],
    }


def svg(results: list[dict[str, object]], disk_mib: int, path: Path) -> None:
    """A plain SVG line chart: MiB used on the disk over time, one line per tool."""
    width, height, pad = 720, 320, 40
    series = {str(r["peer"]): r["series"] for r in results}
    t_max = max((t for s in series.values() for t, _ in s), default=1.0)  # type: ignore[attr-defined]
    colours = {"sidecar": "#1f77b4", "rclone-move": "#d62728"}

    def xy(t: float, mib: float) -> str:
        return f"{pad + (width - 2 * pad) * t / t_max:.1f},{height - pad - (height - 2 * pad) * mib / disk_mib:.1f}"

    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{pad}" y="{pad - 8}">MiB used of {disk_mib} MiB (top line = full)</text>',
             f'<text x="{width - pad - 60}" y="{height - 10}">{t_max:.0f} s</text>',
             f'<line x1="{pad}" y1="{pad}" x2="{width - pad}" y2="{pad}" stroke="#999" stroke-dasharray="4"/>']
    for i, (peer, points) in enumerate(series.items()):
        drawn = " ".join(xy(t, m) for t, m in points)  # type: ignore[attr-defined]
        colour = colours.get(peer, "black")
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{drawn}"/>')
        lines.append(f'<text x="{width - pad - 120}" y="{pad + 20 + 16 * i}" fill="{colour}">{peer}</text>')
    lines.append("</svg>")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--drain", type=float, default=15.0)
    parser.add_argument("--disk-mib", type=int, default=256)
    parser.add_argument("--rate", type=float, default=4.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/retention.py mounts a tmpfs per tool: run it as root")
    rclone = shutil.which("rclone") or ""
    if not rclone:
        subprocess.run(["bash", str(BENCH / "setup.sh")], check=True)
        rclone = shutil.which("rclone") or ""
    work = Path(tempfile.mkdtemp(prefix="sidecar-retention-", dir="/var/tmp"))
    server = LocalBucket(work)
    server.start()
    try:
        ctx = contenders.Ctx(repo=REPO, bench=BENCH, work=work, server=server, quick=False, rclone=rclone)
        results = [run_peer(ctx, peer, args) for peer in PEERS]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = BENCH / "results"
    svg(results, args.disk_mib, out / "retention-latest.svg")
    (out / "retention-latest.json").write_text(json.dumps(
        {"started": datetime.now(UTC).isoformat(), "argv": sys.argv[1:], "results": results}, indent=1))
    keys = [k for k in results[0] if k not in ("peer", "series")]
    rows = ["| metric | " + " | ".join(str(r["peer"]) for r in results) + " |",
            "|---|" + "---|" * len(results)]
    rows += [f"| {k} | " + " | ".join(str(r[k]) for r in results) + " |" for k in keys]
    sidecar, peer = results
    ratio = (float(sidecar["cpu_s"]) / float(peer["cpu_s"])) if float(peer["cpu_s"]) else float("nan")
    text = "\n".join([f"# Retention — {datetime.now(UTC):%Y-%m-%d %H:%M UTC}", "",
                      f"`python bench/retention.py {' '.join(sys.argv[1:])}`: {args.seconds:.0f} s at "
                      f"{args.rate}/s into {args.disk_mib} MiB; plot: retention-latest.svg", "", *rows, "",
                      f"CPU ratio sidecar / rclone-move: {ratio:.2f}", ""])
    (out / "retention-latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
