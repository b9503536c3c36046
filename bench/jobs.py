#!/usr/bin/env python3
"""Jobs benchmark: how soon a ComfyUI prompt is known to be safely stored, and what knowing costs.

    python bench/jobs.py [--prompts 240] [--files 2] [--bytes 400000]

A ComfyUI stand-in (tests/support/comfyui_api.py: the recorded API shapes and timing order, files written in
place in 64 KiB chunks) runs ``--prompts`` prompts one after another, each writing ``--files`` PNG-like files,
into a folder the daemon watches; a client waits on each with ``GET /jobs/{id}?wait=60`` right after
submitting it, as a serverless handler does. Three daemon configurations, same workload, same run:

  websocket   jobs on, ComfyUI's status broadcasts trigger the polls (the default)
  polling     jobs on, SIDECAR_COMFYUI_WEBSOCKET=false (polls every 0.5 s while a prompt runs)
  jobs-off    SIDECAR_COMFYUI_URL="" (the daemon as before jobs: the baseline for CPU)

Measured per prompt: last file closed -> manifest committed (the object's commit time on localbucket's
disk), last file closed -> the client's wait returned, requests to ComfyUI, requests to the store, and the
daemon's CPU (minus the jobs-off baseline: what jobs cost). Every file's object is compared byte for byte
with the file. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

import contenders  # noqa: E402
import machine  # noqa: E402
from lbserver import LocalBucket  # noqa: E402
from support.comfyui_api import ComfyApi  # noqa: E402

VARIANTS = {
    "websocket": {},
    "polling": {"SIDECAR_COMFYUI_WEBSOCKET": "false"},
    "jobs-off": {"SIDECAR_COMFYUI_URL": ""},
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def get_json(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        data: dict[str, Any] = json.load(answer)
        return data


def run_variant(ctx: contenders.Ctx, name: str, args: argparse.Namespace) -> dict[str, Any]:
    base = ctx.work / name
    watch = base / "out"
    watch.mkdir(parents=True)
    bucket = ctx.server.new_bucket(f"jobs-{name}")
    api = ComfyApi(watch).start()
    ctx.sidecar_env = {"SIDECAR_COMFYUI_URL": api.url, "SIDECAR_LOG_LEVEL": "INFO", **VARIANTS[name]}
    running = contenders.start_watcher(ctx, "sidecar", watch, bucket, base)
    port = next(json.loads(line)["port"] for line in running.log.read_text().splitlines()
                if '"http_started"' in line)
    daemon = f"http://127.0.0.1:{port}"
    graph = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench/img", "count": args.files,
                                                         "bytes": args.bytes, "chunk_pause_s": 0.01}}}
    to_wait: list[float] = []
    to_manifest: list[float] = []
    states: dict[str, int] = {}
    try:
        time.sleep(1.5)  # the start's first poll and websocket connect are not part of any prompt
        api.requests.clear()
        requests0 = sum(ctx.server.requests(bucket).values())
        cpu0 = running.cpu_s()
        for n in range(args.prompts):
            graph["9"]["inputs"]["bytes"] = args.bytes + n  # no two prompts alike: the cache never answers
            pid = api.submit(graph)
            if name == "jobs-off":
                api.wait_done(pid)
                continue
            doc = get_json(f"{daemon}/jobs/{pid}?wait=60", timeout=75)
            returned = time.time()
            states[doc["state"]] = states.get(doc["state"], 0) + 1
            last_close = max(api.closed_at[f["path"]] for f in doc["files"])
            to_wait.append(returned - last_close)
            manifest = ctx.server.objects(bucket).get(doc["manifest_key"])
            if manifest is not None:
                to_manifest.append(manifest[1] - last_close)
        if name == "jobs-off":  # the baseline's CPU window ends when its last file is stored
            expected = {p.relative_to(watch).as_posix(): p.stat().st_size for p in watch.rglob("*.png")}
            while ctx.server.arrived(bucket, expected)[0] < len(expected):
                time.sleep(0.05)
        cpu = running.cpu_s() - cpu0
        store_requests = sum(ctx.server.requests(bucket).values()) - requests0
        comfy_requests = len([r for r in api.requests if r.startswith("GET ")])
    finally:
        running.stop()
        api.close()
    files = sorted(watch.rglob("*.png"))
    stored = ctx.server.bucket_dir(bucket)
    mismatched = sum(1 for p in files if (stored / p.relative_to(watch)).read_bytes() != p.read_bytes())
    ctx.server.drop_bucket(bucket)
    return {
        "variant": name, "prompts": args.prompts, "files": len(files), "objects_differing": mismatched,
        "states": states, "cpu_s": round(cpu, 3), "cpu_ms_per_prompt": round(1000 * cpu / args.prompts, 2),
        "comfyui_requests_per_prompt": round(comfy_requests / args.prompts, 2),
        "store_requests_per_prompt": round(store_requests / args.prompts, 2),
        "close_to_manifest_ms": {"p50": round(1000 * pct(to_manifest, 0.5), 1),
                                 "p99": round(1000 * pct(to_manifest, 0.99), 1), "n": len(to_manifest)},
        "close_to_wait_ms": {"p50": round(1000 * pct(to_wait, 0.5), 1), "p99": round(1000 * pct(to_wait, 0.99), 1),
                             "mean": round(1000 * statistics.fmean(to_wait), 1) if to_wait else None,
                             "n": len(to_wait)},
    }


def render(results: list[dict[str, Any]], info: dict[str, str], args: argparse.Namespace) -> str:
    off = next(r for r in results if r["variant"] == "jobs-off")
    lines = [f"# Jobs benchmark ({datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC)", "", machine.markdown(info), "",
             f"`python bench/jobs.py --prompts {args.prompts} --files {args.files} --bytes {args.bytes}`: "
             f"{args.prompts} prompts one after another, {args.files} files of {args.bytes // 1000} kB each, a "
             "client waiting on each with `GET /jobs/{id}?wait=60`.", "",
             "| daemon | last file closed → manifest committed p50 / p99 | → `wait` returned p50 / p99 | "
             "ComfyUI GETs / prompt | store requests / prompt | daemon CPU ms / prompt (jobs' share) | "
             "objects ≠ files |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["variant"] == "jobs-off":
            lines.append(f"| jobs off (baseline) | — | — | 0 | {r['store_requests_per_prompt']} | "
                         f"{r['cpu_ms_per_prompt']} | {r['objects_differing']} |")
            continue
        m, w = r["close_to_manifest_ms"], r["close_to_wait_ms"]
        share = round(r["cpu_ms_per_prompt"] - off["cpu_ms_per_prompt"], 2)
        lines.append(f"| {r['variant']} | {m['p50']} / {m['p99']} ms | {w['p50']} / {w['p99']} ms | "
                     f"{r['comfyui_requests_per_prompt']} | {r['store_requests_per_prompt']} | "
                     f"{r['cpu_ms_per_prompt']} ({share:+}) | {r['objects_differing']} |")
    lines += ["", "Store requests per prompt: one PUT per file plus the manifest's one PUT (a Class A request "
              "on R2). Latency includes the settle wait of the last file (`SIDECAR_SETTLE_S`, 0.15 s)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--bytes", type=int, default=400_000)
    parser.add_argument("--only", default=",".join(VARIANTS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidecar-jobs-", dir="/var/tmp"))
    server = LocalBucket(work)
    server.start()
    try:
        ctx = contenders.Ctx(repo=REPO, bench=BENCH, work=work, server=server, quick=False)
        results = []
        for name in args.only.split(","):
            print(f"jobs bench: {name} ...", file=sys.stderr)
            results.append(run_variant(ctx, name, args))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    info = machine.describe({"rclone": "true", "aws": "true", "inotifywait": "true"}, "", REPO)
    info = {k: v for k, v in info.items() if k not in ("rclone", "aws", "inotifywait")}
    info["server"] = f"localbucket on 127.0.0.1, {server.storage}"
    out = BENCH / "results"
    (out / "jobs-latest.json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    text = render(results, info, args)
    (out / "jobs-latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
