"""Workload 6, ComfyUI's writers: does confirming a file at its close event ever upload too early?

The daemon confirms a file whose writer's close event came last at once, without a settle wait. That is
only safe if ComfyUI's writers close each output once, after its last byte. Each shape below is one real
writer's system-call pattern, written by a separate process where the real one is (ffmpeg):

``pil``          PIL ``Image.save``: open on the final name, the encoder's chunks with pauses, one close.
                 2.6 MB per file (the PNG size of FIELD-NOTES §2), also used for the CPU-per-PNG figure.
``pyav``         PyAV/ffmpeg mp4: mdat chunks, a seek back to patch the header, moov at the end, close;
                 then the faststart-style read-only reopen (a close without write).
``safetensors``  SaveLatent: write ``.tmpXXXX``, rename onto ``.latent``, and only then close (the bytes of
                 the last buffered write land after the rename).
``vhs``          VideoHelperSuite: an ffmpeg process that fails before creating the file (metadata pass),
                 then a second ffmpeg process that writes it, then a third that writes ``-audio.mp4``
                 from it.

Per shape: every object's bytes against its file, objects per file (re-uploads), objects under keys no
file has (variant keys), and close -> committed latency. Then, for the ``pil`` files, the physical floor
measured in the same run: one MD5 pass plus one send of the bytes over a socket to the same server, CPU
per file, against the daemon's CPU per file (its whole process over the shape's window).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from contenders import Ctx
from harness import Sample, fresh_dir, integrity, measure_watcher, request_summary
from wl_steady import latency_metrics

NAME = "writers"
DEFAULT_PEERS = ["sidecar"]
SHAPES = ("pil", "pyav", "safetensors", "vhs")
PER_SHAPE = 60
RATE = 4.0
PNG_SIZE = 2_600_000
CHUNK_PAUSE_S = 0.02

FFMPEG_LIKE = r"""
import os, sys, time
path, size, fail = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fail"
if fail:
    sys.exit(1)  # like ffmpeg refusing the metadata arguments: no output file
data = os.urandom(size)
with open(path, "wb") as f:
    step = -(-size // 6)
    for start in range(0, size, step):
        f.write(data[start:start + step]); f.flush(); time.sleep(0.02)
"""


def _pil(path: Path, data: bytes) -> None:
    step = -(-len(data) // 8)
    with open(path, "wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start : start + step])
            f.flush()
            time.sleep(CHUNK_PAUSE_S)


def _pyav(path: Path, data: bytes) -> None:
    header, body = data[:4096], data[4096:]
    with open(path, "wb") as f:
        f.write(b"\0" * len(header))  # placeholder ftyp/mdat header, patched at the end
        step = -(-len(body) // 10)
        for start in range(0, len(body) - 8192, step):
            f.write(body[start : min(start + step, len(body) - 8192)])
            f.flush()
            time.sleep(CHUNK_PAUSE_S)
        f.write(body[len(body) - 8192 :])  # moov
        f.flush()
        f.seek(0)
        f.write(header)  # the muxer patches the mdat size in place
    with open(path, "rb") as f:  # faststart's read-only pass
        f.read(65536)


def _safetensors(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp{os.getpid()}{path.stem[-5:]}")
    f = open(tmp, "wb")  # noqa: SIM115 - the close must come after the rename, as in safetensors
    f.write(data[: len(data) // 2])
    f.flush()
    time.sleep(CHUNK_PAUSE_S)
    f.write(data[len(data) // 2 :])  # buffered: reaches the file at the close, after the rename
    os.replace(tmp, path)
    f.close()


def _vhs(path: Path, size: int) -> dict[str, Path]:
    run = [sys.executable, "-c", FFMPEG_LIKE, str(path), str(size)]
    subprocess.run([*run, "fail"], check=False)
    subprocess.run([*run, "ok"], check=True)
    audio = path.with_name(path.stem + "-audio.mp4")
    subprocess.run([*run[:3], str(audio), str(size // 2), "ok"], check=True)
    return {path.name: path, audio.name: audio}


def write_shape(shape: str, folder: Path, pool: bytes, expected: dict[str, int], closed: dict[str, float]) -> None:
    start = time.monotonic()
    for i in range(PER_SHAPE):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if shape == "vhs":
            for name, path in _vhs(folder / f"AnimateDiff_{i + 1:05d}.mp4", 1_500_000).items():
                expected[name] = path.stat().st_size
                closed[name] = path.stat().st_mtime
            continue
        ext = {"pil": "png", "pyav": "mp4", "safetensors": "latent"}[shape]
        size = PNG_SIZE if shape == "pil" else 1_000_000 + 7919 * i
        data = pool[i * 31 : i * 31 + size]
        path = folder / f"ComfyUI_{i + 1:05d}_.{ext}"
        {"pil": _pil, "pyav": _pyav, "safetensors": _safetensors}[shape](path, data)
        expected[path.name] = size
        closed[path.name] = time.time()


def floor_cpu_per_file(ctx: Ctx, folder: Path, names: list[str]) -> float:
    """CPU seconds per file of the physical minimum: one MD5 pass and one send of the bytes (a bare HTTP
    PUT, over TLS with run.py --tls; no signing: localbucket checks no credentials) to the same server, on
    this thread."""
    url = urllib.parse.urlsplit(ctx.server.endpoint)
    bucket = ctx.server.new_bucket("writers-floor")
    conn = (http.client.HTTPSConnection(url.hostname or "127.0.0.1", url.port,
                                        context=ssl.create_default_context(cafile=ctx.server.ca_bundle))
            if url.scheme == "https" else http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port))
    cpu = 0.0
    try:
        for name in names:
            t = time.thread_time()
            with open(folder / name, "rb") as f:
                data = f.read()
            hashlib.md5(data).hexdigest()
            conn.request("PUT", f"/{bucket}/{name}", body=data, headers={"Content-Length": str(len(data))})
            conn.getresponse().read()
            cpu += time.thread_time() - t
    finally:
        conn.close()
        ctx.server.drop_bucket(bucket)
    return cpu / max(1, len(names))


def run(ctx: Ctx, peers: list[str], runs: int, log: callable) -> list[Sample]:  # type: ignore[valid-type]
    samples = []
    for r in range(runs):
        pool = os.urandom(PNG_SIZE + PER_SHAPE * 31)
        for shape in SHAPES:
            bucket = ctx.server.new_bucket(f"writers-{shape}-{r}")
            watch = fresh_dir(ctx.work / "watch")
            obs = measure_watcher(
                ctx, "sidecar", bucket, watch, fresh_dir(ctx.work / "state" / bucket),
                writer=lambda exp, clo, s=shape, w=watch, p=pool: write_shape(s, w, p, exp, clo),
                cap_s=PER_SHAPE / RATE + 60, poll_s=0.1,
            )
            keys = [k for k in obs.expected if k in obs.committed and k in obs.closed]
            per_file, detail = request_summary(obs.requests, len(obs.expected))
            puts = obs.requests.get("PUT", 0)
            sample = Sample(peer=f"sidecar/{shape}", run=r, requests=obs.requests, finished=obs.finished)
            sample.metrics = {
                **latency_metrics([obs.committed[k] - obs.closed[k] for k in keys]), **integrity(obs),
                "files": len(obs.expected), "arrived": len(keys), "requests_per_file": per_file,
                "reuploads": max(0, puts - len(obs.expected)),
                "cpu_ms_per_file": obs.cpu_s * 1000 / max(1, len(keys)),
            }
            if shape == "pil":
                floor = floor_cpu_per_file(ctx, watch, sorted(obs.expected))
                sample.metrics["floor_cpu_ms_per_file"] = floor * 1000
                sample.metrics["cpu_x_floor"] = sample.metrics["cpu_ms_per_file"] / (floor * 1000)
            sample.note = "; ".join(x for x in (f"DNF ({obs.stop_reason})" if not obs.finished else "", detail) if x)
            log(NAME, sample)
            samples.append(sample)
            ctx.server.drop_bucket(bucket)
    return samples
