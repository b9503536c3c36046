"""A stand-in for ComfyUI 0.8's job API, in the shapes and the order recorded in shared/comfyui-api-samples.

It runs prompts one at a time (FIFO) on a worker thread and writes their files the way ComfyUI's save nodes
do: in place, under their final names ``<prefix>_<5-digit counter>_.<ext>`` (counter = 1 + the highest on
disk), in 64 KiB chunks. What a third party sees, as recorded:

- ``POST /prompt`` answers ``{"prompt_id", "number", "node_errors": {}}`` at once;
- while a prompt runs, ``/api/jobs/{id}`` says ``in_progress`` without outputs, ``/history/{id}`` is ``{}``;
- files exist (growing, then closed) **before** any API names them; the job flips to ``completed`` (or
  ``failed``, keeping what was written) once, after its last node, with every node's files;
- an identical graph submitted again is answered from the cache: a new id, nothing written, the old files
  listed, ``execution_cached`` naming the nodes;
- :meth:`restart` forgets history and jobs (they live in memory), file counters continue from disk;
- :attr:`mode` ``"garbage"`` answers HTML, ``"error"`` 500, ``"slow"`` sleeps ``slow_s`` first;
- ``GET /ws`` is the websocket: ``status`` (``queue_remaining``) goes to every client on connect, when a prompt
  is queued, when it starts and after it ends (after its history is written); ``websocket = False`` refuses it.

A graph is ``{node_id: {"class_type": ..., "inputs": {...}}}`` of these output nodes, run in dict order:
``SaveImage`` (``filename_prefix``, ``count``, ``bytes``), ``SaveVideo`` (one ``.mp4`` of ``bytes``, with
``chunk_pause_s`` between chunks), ``SaveLatent`` (one ``.latent``), ``Ghost`` (lists ``count`` files it never
writes) and ``Fail`` (raises: the prompt fails after the nodes before it).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import re
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
EXT = {"SaveImage": "png", "SaveVideo": "mp4", "SaveLatent": "latent", "Ghost": "png"}
MEDIA = {"SaveImage": "images", "SaveVideo": "images", "SaveLatent": "latents", "Ghost": "images"}


def _ms() -> int:
    return int(time.time() * 1000)


def _frame(payload: bytes) -> bytes:
    """An unmasked server text frame."""
    size = len(payload)
    head = bytes([0x81, size]) if size < 126 else bytes([0x81, 126]) + struct.pack("!H", size)
    return head + payload


class ComfyApi:
    def __init__(self, output_dir: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.output_dir = output_dir
        self.host, self.port = host, port
        self.mode = "ok"
        self.slow_s = 5.0
        self.requests: list[str] = []  # "GET /api/jobs?..." of every request served
        self.websocket = True
        self.status_sent = 0  # status broadcasts, per client
        self._sockets: list[socket.socket] = []
        self.closed_at: dict[str, float] = {}  # relative path -> time.time() its writer closed it
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, dict[str, Any]] = {}
        self._number = 2
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._server: ThreadingHTTPServer | None = None
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ComfyApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._serve(self, "GET")

            def do_POST(self) -> None:
                api._serve(self, "POST")

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections (prompts already queued keep running)."""
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._sockets.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self) -> None:
        """ComfyUI restarted: history, jobs and the cache are gone; the queue too."""
        with self._lock:
            self._jobs.clear()
            self._cache.clear()

    def close(self) -> None:
        self.stop()
        self._queue.put(None)

    def __enter__(self) -> ComfyApi:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- prompts ----------------------------------------------------------------------------------------

    def submit(self, graph: dict[str, Any], client_id: str | None = None) -> str:
        prompt_id = str(uuid.uuid4())
        with self._lock:
            number, self._number = self._number, self._number + 1
            extra: dict[str, Any] = {"create_time": _ms()}
            if client_id:
                extra["client_id"] = client_id
            self._jobs[prompt_id] = {"id": prompt_id, "status": "pending", "priority": number,
                                     "create_time": extra["create_time"], "graph": graph, "extra": extra}
        self._queue.put(prompt_id)
        self.broadcast_status()
        return prompt_id

    def wait_done(self, prompt_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                job = self._jobs.get(prompt_id)
                if job is None or job["status"] in ("completed", "failed"):
                    return dict(job or {})
            time.sleep(0.01)
        raise TimeoutError(prompt_id)

    def _next_name(self, prefix: str, ext: str) -> tuple[str, str]:
        sub, _, base = prefix.rpartition("/")
        folder = self.output_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(base) + r"_(\d{5})_\.")
        taken = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
        return sub, f"{base}_{max(taken, default=0) + 1:05d}_.{ext}"

    def _write(self, sub: str, name: str, size: int, pause_s: float) -> None:
        path = self.output_dir / sub / name
        data = os.urandom(size)
        with open(path, "wb") as f:  # in place, no temp file, no rename
            for start in range(0, size, CHUNK):
                f.write(data[start:start + CHUNK])
                f.flush()
                if pause_s:
                    time.sleep(pause_s)
        self.closed_at[f"{sub}/{name}" if sub else name] = time.time()

    def _run_node(self, node: dict[str, Any]) -> list[dict[str, str]]:
        kind, inputs = node["class_type"], node.get("inputs", {})
        if kind == "Fail":
            raise RuntimeError("**** ERROR: Saving image outside the output folder is not allowed.")
        items = []
        for _ in range(int(inputs.get("count", 1))):
            sub, name = self._next_name(str(inputs.get("filename_prefix", "ComfyUI")), EXT[kind])
            if kind == "Ghost":
                name = name.replace("_.", "_ghost_.")
            else:
                self._write(sub, name, int(inputs.get("bytes", 4096)), float(inputs.get("chunk_pause_s", 0)))
            items.append({"filename": name, "subfolder": sub, "type": "output"})
        return items

    def _work(self) -> None:
        while (prompt_id := self._queue.get()) is not None:
            with self._lock:
                job = self._jobs.get(prompt_id)
                if job is None:
                    continue
                job["status"], job["execution_start_time"] = "in_progress", _ms()
                graph = job["graph"]
            self.broadcast_status()
            start = job["execution_start_time"]
            messages: list[list[Any]] = [["execution_start", {"prompt_id": prompt_id, "timestamp": start}]]
            signature = json.dumps(graph, sort_keys=True)
            outputs: dict[str, Any] = {}
            error: dict[str, Any] | None = None
            cached = self._cache.get(signature)
            if cached is not None:
                messages.append(["execution_cached", {"nodes": sorted(graph), "prompt_id": prompt_id,
                                                      "timestamp": _ms()}])
                outputs = cached
            else:
                messages.append(["execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": _ms()}])
                for node_id, node in graph.items():
                    try:
                        items = self._run_node(node)
                    except RuntimeError as exc:
                        error = {"prompt_id": prompt_id, "node_id": node_id, "node_type": node["class_type"],
                                 "executed": list(outputs), "exception_message": str(exc),
                                 "exception_type": "Exception", "traceback": [], "timestamp": _ms()}
                        break
                    outputs[node_id] = {MEDIA[node["class_type"]]: items}
                if error is None:
                    self._cache[signature] = outputs
            end = _ms()
            messages.append(["execution_error", error] if error else
                            ["execution_success", {"prompt_id": prompt_id, "timestamp": end}])
            with self._lock:  # history and the job flip together, after the last node (task_done)
                if prompt_id not in self._jobs:
                    continue
                job.update(status="failed" if error else "completed", execution_end_time=end, outputs=outputs,
                           execution_status={"status_str": "error" if error else "success",
                                             "completed": error is None, "messages": messages})
                if error:
                    job["execution_error"] = error
            self.broadcast_status()  # after the history is written, as PromptQueue.task_done does

    # -- the websocket ----------------------------------------------------------------------------------

    def _remaining(self) -> int:
        return sum(1 for j in self._jobs.values() if j["status"] in ("pending", "in_progress"))

    def broadcast_status(self) -> None:
        with self._lock:
            message = json.dumps({"type": "status", "data": {"status": {"exec_info": {
                "queue_remaining": self._remaining()}}}}).encode()
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.sendall(_frame(message))
                self.status_sent += 1

    def _serve_ws(self, handler: BaseHTTPRequestHandler) -> None:
        key = handler.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept.decode())
        handler.end_headers()
        handler.wfile.flush()
        sock = handler.connection
        sid = parse_qs(urlsplit(handler.path).query).get("clientId", [uuid.uuid4().hex])[0]
        with self._lock:
            first = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self._remaining()}},
                                                "sid": sid}}
            self._sockets.append(sock)
        sock.sendall(_frame(json.dumps(first).encode()))
        try:
            while sock.recv(65536):  # a client's frames (pongs, closes) are read and ignored
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)

    # -- the HTTP API -----------------------------------------------------------------------------------

    def _item(self, job: dict[str, Any], *, full: bool) -> dict[str, Any]:
        out = {k: job[k] for k in ("id", "status", "priority", "create_time") if k in job}
        if job["status"] in ("completed", "failed"):
            out["execution_start_time"] = job["execution_start_time"]
            out["execution_end_time"] = job["execution_end_time"]
            if "execution_error" in job:
                out["execution_error"] = job["execution_error"]
            count = sum(len(v) for ui in job["outputs"].values() for v in ui.values())
            out["outputs_count"] = count
            if full:
                out["outputs"] = job["outputs"]
                out["execution_status"] = job["execution_status"]
                out["workflow"] = {"prompt": job["graph"], "extra_data": job["extra"]}
        else:
            out["outputs_count"] = 0
        return out

    def _answer(self, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:  # noqa: PLR0911
        path = path.removeprefix("/api") if path.startswith("/api/") and not path.startswith("/api/jobs") else path
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j["create_time"], reverse=True)
            if path == "/prompt" and body:
                graph = json.loads(body)
                pid = None
            elif path == "/prompt":
                running = sum(1 for j in jobs if j["status"] in ("pending", "in_progress"))
                return 200, {"exec_info": {"queue_remaining": running}}
            elif path == "/api/jobs":
                wanted = query.get("status", ["pending,in_progress,completed,failed"])[0].split(",")
                chosen = [j for j in jobs if j["status"] in wanted]
                limit = int(query.get("limit", [0])[0]) or None
                offset = max(0, int(query.get("offset", [0])[0]))
                page = chosen[offset:offset + limit if limit else None]
                return 200, {"jobs": [self._item(j, full=False) for j in page],
                             "pagination": {"offset": offset, "limit": limit, "total": len(chosen),
                                            "has_more": offset + len(page) < len(chosen)}}
            elif path.startswith("/api/jobs/"):
                job = self._jobs.get(path.removeprefix("/api/jobs/"))
                return (200, self._item(job, full=True)) if job else (404, {"error": "Job not found"})
            elif path.startswith("/history/"):
                job = self._jobs.get(path.removeprefix("/history/"))
                if job is None or job["status"] not in ("completed", "failed"):
                    return 200, {}
                return 200, {job["id"]: {"prompt": [job["priority"], job["id"], job["graph"], job["extra"], []],
                                         "outputs": job["outputs"], "status": job["execution_status"], "meta": {}}}
            else:
                return 404, {"error": "not found"}
        pid = self.submit(graph["prompt"], graph.get("client_id"))
        return 200, {"prompt_id": pid, "number": self._jobs[pid]["priority"], "node_errors": {}}

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        if parts.path == "/ws" and self.websocket and handler.headers.get("Upgrade", "").lower() == "websocket":
            self.requests.append(f"WS {handler.path}")
            self._serve_ws(handler)
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if method == "POST" and length else b""
        self.requests.append(f"{method} {handler.path}")
        if self.mode == "slow":
            time.sleep(self.slow_s)
        if self.mode == "garbage":
            status, raw, ctype = 200, b"<html><body>Bad Gateway</body></html>", "text/html"
        elif self.mode == "error":
            status, raw, ctype = 500, b"500 Internal Server Error", "text/plain"
        else:
            status, doc = self._answer(parts.path, parse_qs(parts.query), body)
            raw, ctype = json.dumps(doc).encode(), "application/json; charset=utf-8"
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)
