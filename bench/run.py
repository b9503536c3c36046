#!/usr/bin/env python3
"""Benchmark the sidecar daemon against what a user would run instead, in one run, on one local S3 server.

    python bench/run.py [--quick] [--runs 3] [--only burst,steady,large,cold,idle] [--peers sidecar,rclone,...]

Installs what is missing (bench/setup.sh), starts localbucket on a tmpfs, runs every workload against
every tool, prints the tables and writes them to bench/results/latest.md (plus latest.json). Nothing is
asserted: the numbers are reported. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import contenders  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402
import wl_burst  # noqa: E402
import wl_cold  # noqa: E402
import wl_idle  # noqa: E402
import wl_large  # noqa: E402
import wl_memory  # noqa: E402
import wl_million  # noqa: E402
import wl_steady  # noqa: E402
import wl_writers  # noqa: E402
from harness import Sample  # noqa: E402
from lbserver import LocalBucket  # noqa: E402

TLS_WORKLOADS = ("burst", "steady", "writers", "large", "memory")
WORKLOADS = {m.NAME: m for m in (wl_burst, wl_steady, wl_writers, wl_large, wl_memory, wl_cold, wl_million, wl_idle)}
TITLES = {
    "burst": "1 · Burst: 1,000 x 200 KB written as fast as possible",
    "steady": "2 · Steady stream, ComfyUI-like: 0.5-3 MB files at 4/s, written in place in 8 chunks",
    "large": "3 · Large file",
    "cold": "4 · Cold start over a big tree of already-uploaded files",
    "idle": "8 · Idle over a populated tree",
    "writers": "6 · ComfyUI's writers: confirmed at the close event, uploaded once, byte-identical",
    "memory": "7 · Memory: four 60 MB single PUTs at once, and RSS over a 20,000-file stream",
    "million": "5 · Scale: restart over 1,000,000 already-uploaded files",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller workloads, 1 run (about 5 minutes)")
    p.add_argument("--runs", type=int, help="runs per workload (default 3, --quick 1)")
    p.add_argument("--only", default="", help="workloads, comma-separated (default: all; with --tls, those it runs)")
    p.add_argument("--peers", default="", help="tools, comma-separated (default: each workload's own list)")
    p.add_argument("--no-sidecar", action="store_true", help="leave the daemon out")
    p.add_argument("--sidecar-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the daemon, e.g. SIDECAR_SETTLE_S=0.1 (repeatable)")
    p.add_argument("--tls", action="store_true",
                   help=f"https variant: TLS (stunnel) in front of the server; workloads {', '.join(TLS_WORKLOADS)}")
    p.add_argument("--output", type=Path, default=BENCH / "results" / "latest.md")
    p.add_argument("--work-dir", type=Path, help="scratch folder (default: a new one under /var/tmp)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (tool logs) afterwards")
    p.add_argument("--from-json", type=Path, help="re-render the tables of an earlier latest.json, run nothing")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.only = [w for w in args.only.split(",") if w] or list(TLS_WORKLOADS if args.tls else WORKLOADS)
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s) {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.tls and set(args.only) - set(TLS_WORKLOADS):
        p.error(f"--tls runs {', '.join(TLS_WORKLOADS)} (the others measure no request path); "
                f"not {sorted(set(args.only) - set(TLS_WORKLOADS))}")
    args.peers = [x for x in args.peers.split(",") if x]
    if set(args.peers) - set(contenders.PEERS):
        p.error(f"unknown tool(s) {sorted(set(args.peers) - set(contenders.PEERS))}; "
                f"choose from {', '.join(contenders.PEERS)}")
    return args


def ensure_tools() -> dict[str, str]:
    """Paths of the tools, running bench/setup.sh first if any is missing."""
    def find() -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)  # the real aws script, not a pyenv shim (it costs CPU)
        found = {"aws": shutil.which("aws", path=bindir + os.pathsep + os.environ.get("PATH", "")) or "",
                 "rclone": shutil.which("rclone") or "", "inotifywait": shutil.which("inotifywait") or "",
                 "stunnel": shutil.which("stunnel4") or shutil.which("stunnel") or ""}
        for module in ("localbucket", "boto3", "awscli"):
            found[module] = "ok" if _importable(module) else ""
        return found

    tools = find()
    if not all(tools.values()):
        print(f"bench: installing {[k for k, v in tools.items() if not v]} via bench/setup.sh", file=sys.stderr)
        subprocess.run(["bash", str(BENCH / "setup.sh")], check=True, env={**os.environ, "PYTHON": sys.executable})
        tools = find()
    missing = [k for k, v in tools.items() if not v]
    if missing:
        sys.exit(f"bench: still missing {missing} after bench/setup.sh")
    return tools


def _importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


def sidecar_runs() -> str:
    """The daemon's --version line, or '' if it cannot start from this work tree yet."""
    r = subprocess.run([sys.executable, "-m", "sidecar", "--version"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def peers_for(name: str, args: argparse.Namespace, with_sidecar: bool) -> list[str]:
    module = WORKLOADS[name]
    default = getattr(module, "QUICK_PEERS", module.DEFAULT_PEERS) if args.quick else module.DEFAULT_PEERS
    chosen = [p for p in default if not args.peers or p in args.peers]
    return [p for p in chosen if with_sidecar or p != "sidecar"]


def progress(workload: str, s: Sample) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in s.metrics.items())
    print(f"  {workload:6} {s.peer:24} run {s.run}: {shown}  {s.note[:160]}", file=sys.stderr, flush=True)


def rerender(args: argparse.Namespace) -> int:
    """Rebuild latest.md from a saved latest.json (after changing the report code, say)."""
    data = json.loads(args.from_json.read_text())
    saved = data.get("argv", [])
    args.quick = "--quick" in saved
    results = {w: [Sample(peer=s["peer"], run=s["run"], metrics=s["metrics"], note=s["note"],
                          finished=s["finished"], requests=Counter(s["requests"])) for s in samples]
               for w, samples in data["samples"].items()}
    args.runs = max((s.run for v in results.values() for s in v), default=0) + 1
    markdown = render(args, data["info"], datetime.fromisoformat(data["started"]), results, saved)
    print(markdown)
    args.output.write_text(markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args)
    tools = ensure_tools()
    version = sidecar_runs()
    with_sidecar = bool(version) and not args.no_sidecar
    if not version and not args.no_sidecar:
        print("bench: `python -m sidecar --version` fails in this work tree: running without the daemon",
              file=sys.stderr)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sidecar-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    server = LocalBucket(work)
    started = datetime.now(UTC)
    info = machine.describe(tools, version or "not runnable in this work tree", REPO)
    results: dict[str, list[Sample]] = {}
    t0 = time.monotonic()
    server.start()
    try:
        if args.tls:
            server.put_tls_in_front()
        ctx = contenders.Ctx(repo=REPO, bench=BENCH, work=work, server=server, quick=args.quick,
                             aws=tools["aws"], rclone=tools["rclone"], inotifywait=tools["inotifywait"],
                             sidecar_env=dict(kv.split("=", 1) for kv in args.sidecar_env))
        ctx.write_tool_configs()
        info["server"] = f"localbucket on 127.0.0.1, data on {server.storage}" + (
            "; **https**: every tool talks TLS to stunnel in front of it (bench/tlsfront.py)" if args.tls else "")
        for name in args.only:
            peers = peers_for(name, args, with_sidecar)
            print(f"bench: {name} x {args.runs} run(s): {', '.join(peers)}", file=sys.stderr, flush=True)
            w0 = time.monotonic()
            results[name] = WORKLOADS[name].run(ctx, peers, args.runs, progress)
            print(f"bench: {name} took {time.monotonic() - w0:.0f} s", file=sys.stderr, flush=True)
    finally:
        server.stop()
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    info["duration"] = f"{time.monotonic() - t0:.0f} s"
    end_commit = machine.commit(REPO)
    if end_commit not in info["sidecar"]:
        info["sidecar"] += f"; **sidecar/ changed ({end_commit}) during the run**: later runs used newer code"
    markdown = render(args, info, started, results, sys.argv[1:])
    print(markdown)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown)
    args.output.with_suffix(".json").write_text(json.dumps(
        {"started": started.isoformat(), "info": info, "argv": sys.argv[1:],
         "samples": {k: [s.as_json() for s in v] for k, v in results.items()}}, indent=1))
    print(f"bench: wrote {args.output} and {args.output.with_suffix('.json').name}", file=sys.stderr)
    return 0


def render(args: argparse.Namespace, info: dict[str, str], started: datetime,
           results: dict[str, list[Sample]], argv: list[str]) -> str:
    aggs = {name: report.aggregate(samples) for name, samples in results.items()}
    mode = "quick" if args.quick else "full"
    if "--tls" in argv:
        mode += " · **https** (TLS in front of the server)"
    out = [f"# Benchmark results — {started.strftime('%Y-%m-%d %H:%M UTC')}", "",
           f"`{' '.join(['python bench/run.py', *argv])}` · {mode} mode · {args.runs} run(s) per tool, "
           "cells are median (min-max) · generated by bench/run.py; see bench/README.md for the method.", "",
           machine.markdown(info), ""]
    out += ["## Summary (medians)", "", report.summary_table(aggs), ""]
    if "sidecar" in {p for samples in results.values() for p in (s.peer for s in samples)}:
        out += ["## Where the daemon stands (issue 14 targets)", "",
                report.table(["target", "sidecar", "limit", "verdict"], targets.rows(aggs)), ""]
    for name, agg in aggs.items():
        title = TITLES[name]
        if name == "large":
            title += f": one {'256 MiB' if args.quick else '1 GiB'} file"
        if name == "cold":
            title += f": {'10,000' if args.quick else '100,000'} files"
        if name == "idle":
            title += (f": {'15' if args.quick else '60'} s, every tool at once, each over "
                      f"{'2,000' if args.quick else '10,000'} uploaded files")
        if name == "steady":
            title += ", for 60 s (240 files)"
        out += [f"## {title}", "", report.TABLES[name](agg), ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
