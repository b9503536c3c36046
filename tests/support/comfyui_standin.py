"""A stand-in for ComfyUI's ``main.py`` inside the test image: writes outputs the way ComfyUI's nodes do.

Copied alone to ``/comfyui/main.py`` of the test base (``tests/container/base``), so stdlib only. It takes
ComfyUI's flags (``--listen``, ``--port``, ``--output-directory``; the last one required, so an image whose
supervisord forgets to point ComfyUI at the watched folder fails), runs as root like the real one, and
serves two endpoints in ComfyUI's spirit:

``POST /prompt`` with ``{"outputs": [{"kind": "png"|"video", "prefix": "sub/name", "count": N,
"bytes": B}], "date_folder": true}``
    answers ``{"prompt_id": ...}`` at once and writes the outputs on a thread, one after another;
``GET /history/<prompt_id>``
    ``{"done": bool, "files": [relative paths]}``, the list complete once ``done``;
``GET /api/jobs``, ``GET /api/jobs/<prompt_id>``
    ComfyUI 0.8's job API in its recorded shapes (each output item is one node), so the sidecar's job
    tracking runs in the image as beside a real ComfyUI (no websocket here: it polls).

The writers (shared/FIELD-NOTES.md §2): every file is written **in place** on its final path in 64 KiB
chunks (no temp file, no rename); a PNG takes a few ms per chunk; a video streams for seconds and pauses
0.3-0.7 s with the file still open after about 2 s, like an encoder waiting for frames; ``date_folder``
writes into a folder created right before the first write (no watch on it yet); names are
``<prefix>_<5-digit counter>_.<ext>`` with counter = 1 + the highest already there. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024
PNG_CHUNK_PAUSE_S = 0.004
VIDEO_SECONDS = 3.0
VIDEO_PAUSE_AT_S = 2.0


def next_name(folder: Path, prefix: str, ext: str) -> Path:
    """ComfyUI's counter: 1 + the highest ``<prefix>_NNNNN_`` already in the folder."""
    pattern = re.compile(re.escape(prefix) + r"_(\d{5})_")
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return folder / f"{prefix}_{max(numbers, default=0) + 1:05d}_.{ext}"


def write_in_place(path: Path, data: bytes, *, video: bool, rng: random.Random) -> None:
    """Open the final path and fill it chunk by chunk, pausing like the real writer."""
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    per_chunk = VIDEO_SECONDS / len(chunks) if video else PNG_CHUNK_PAUSE_S
    paused = not video
    started = time.monotonic()
    with open(path, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
            if not paused and time.monotonic() - started >= VIDEO_PAUSE_AT_S:
                time.sleep(rng.uniform(0.3, 0.7))  # the encoder waits for frames; the file stays open
                paused = True
            time.sleep(per_chunk)


class Prompts:
    """Runs prompts one at a time, like ComfyUI's single execution thread."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.history: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.queue_lock = threading.Lock()
        self.date_folders = 0

    def submit(self, body: dict[str, Any]) -> str:
        prompt_id = str(uuid.uuid4())
        with self.lock:
            self.history[prompt_id] = {"done": False, "files": [], "status": "pending", "nodes": {},
                                       "create_time": int(time.time() * 1000), "priority": len(self.history) + 2}
        threading.Thread(target=self._run, args=(prompt_id, body), daemon=True).start()
        return prompt_id

    def _run(self, prompt_id: str, body: dict[str, Any]) -> None:
        rng = random.Random(prompt_id)
        with self.queue_lock:
            with self.lock:
                self.history[prompt_id].update(status="in_progress", start=int(time.time() * 1000))
            base = self.out_dir
            if body.get("date_folder"):
                self.date_folders += 1
                base = self.out_dir / time.strftime(f"%Y-%m-%d-{self.date_folders:04d}-{prompt_id[:8]}")
            for node, item in enumerate(body.get("outputs", []), start=1):
                kind = item.get("kind", "png")
                sub, _, prefix = str(item.get("prefix", "ComfyUI")).rpartition("/")
                folder = base / sub if sub else base
                for _ in range(int(item.get("count", 1))):
                    os.makedirs(folder, exist_ok=True)
                    path = next_name(folder, prefix, "mp4" if kind == "video" else "png")
                    size = int(item.get("bytes", 3_000_000 if kind == "video" else 200_000))
                    write_in_place(path, rng.randbytes(size), video=kind == "video", rng=rng)
                    with self.lock:
                        rel = str(path.relative_to(self.out_dir))
                        self.history[prompt_id]["files"].append(rel)
                        self.history[prompt_id]["nodes"].setdefault(str(node), []).append(rel)
            with self.lock:  # everything flips at once, after the last node, as in ComfyUI's task_done
                self.history[prompt_id].update(done=True, status="completed", end=int(time.time() * 1000))
        print(f"standin: prompt {prompt_id} done", file=sys.stderr, flush=True)


    def _job(self, prompt_id: str, entry: dict[str, Any], *, full: bool) -> dict[str, Any]:
        """ComfyUI 0.8's /api/jobs item shape (shared/comfyui-api-samples); call with the lock held."""
        job: dict[str, Any] = {"id": prompt_id, "status": entry["status"], "priority": entry["priority"],
                               "create_time": entry["create_time"], "outputs_count": 0}
        if entry["status"] == "completed":
            outputs = {node: {"images": [{"filename": os.path.basename(rel), "subfolder": os.path.dirname(rel),
                                          "type": "output"} for rel in rels]}
                       for node, rels in entry["nodes"].items()}
            job.update(execution_start_time=entry["start"], execution_end_time=entry["end"],
                       outputs_count=len(entry["files"]))
            if full:
                job["outputs"] = outputs
                job["execution_status"] = {"status_str": "success", "completed": True, "messages": []}
        return job

    def jobs_api(self, path: str) -> tuple[int, Any]:
        """``GET /api/jobs[?status=...&limit=N]`` and ``GET /api/jobs/{id}``; call with the lock held."""
        route, _, query = path.partition("?")
        if route.startswith("/api/jobs/"):
            prompt_id = route.removeprefix("/api/jobs/")
            entry = self.history.get(prompt_id)
            return (200, self._job(prompt_id, entry, full=True)) if entry else (404, {"error": "Job not found"})
        params = dict(part.partition("=")[::2] for part in query.split("&") if part)
        wanted = params.get("status", "pending,in_progress,completed,failed").split(",")
        chosen = sorted(((pid, e) for pid, e in self.history.items() if e["status"] in wanted),
                        key=lambda item: item[1]["create_time"], reverse=True)
        limit = int(params.get("limit") or 0) or len(chosen)
        jobs = [self._job(pid, e, full=False) for pid, e in chosen[:limit]]
        return 200, {"jobs": jobs, "pagination": {"offset": 0, "limit": limit, "total": len(chosen),
                                                  "has_more": limit < len(chosen)}}


def serve(prompts: Prompts, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, data: Any) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            if self.path != "/prompt":
                self._answer(404, {"error": "not found"})
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            self._answer(200, {"prompt_id": prompts.submit(body)})

        def do_GET(self) -> None:
            if self.path.startswith("/api/jobs"):
                with prompts.lock:
                    status, data = prompts.jobs_api(self.path)
                self._answer(status, data)
                return
            prompt_id = self.path.removeprefix("/history/")
            with prompts.lock:
                entry = prompts.history.get(prompt_id)
                data = json.loads(json.dumps(entry)) if entry is not None else {}
            self._answer(200 if entry is not None else 404, data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--output-directory", required=True)
    args, _ = parser.parse_known_args()
    out_dir = Path(args.output_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = serve(Prompts(out_dir), args.listen, args.port)
    print(f"standin: listening on {args.listen}:{args.port}, writing to {out_dir}", file=sys.stderr, flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
