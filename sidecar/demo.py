"""``sidecar demo``: the whole daemon against a local S3 server, on a demo folder, with sample images.

Starts moto's S3 server in-process on 127.0.0.1, runs the real daemon on ``<dir>/outputs``, writes a few
PNGs the way ComfyUI does (in place, in chunks, one in a new subfolder), and prints each object as it
arrives in the bucket, compared byte for byte with the file on disk. ``--once`` exits when every sample
is verified; otherwise drop more files into the folder and press Ctrl-C to stop.

It deletes nothing: ``<dir>`` is created with a marker file, a folder without that marker that is not
empty is refused, files dropped in earlier are kept (and uploaded again: the S3 server starts empty each
time), and the journal lives in a temporary folder that only this run made.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import signal
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from sidecar.config import load_settings
from sidecar.errors import EXIT_FAILURE, EXIT_OK, ConfigError, SidecarError
from sidecar.logs import configure_logging

BUCKET = "sidecar-demo"
MARKER = ".sidecar-demo"
SAMPLES = ("ComfyUI_00001_.png", "ComfyUI_00002_.png", "portraits/ComfyUI_00001_.png", "ComfyUI_00003_.png")
ONCE_TIMEOUT_S = 60.0


def sample_png(width: int, height: int, seed: int) -> bytes:
    """A valid RGB PNG with a colour gradient (no imaging library needed)."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            rows += bytes(((x * 255 // width + seed * 40) % 256, (y * 255 // height) % 256, (seed * 70) % 256))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def write_like_comfyui(path: Path, data: bytes, chunk: int = 16 * 1024) -> None:
    """Write in place, in chunks, with small pauses — the file exists half-written for a while."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for start in range(0, len(data), chunk):
            f.write(data[start : start + chunk])
            f.flush()
            time.sleep(0.02)


def _start_s3() -> tuple[Any, str]:
    try:
        from moto.server import ThreadedMotoServer  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise SidecarError("the demo needs moto: pip install -e '.[demo]' in a clone of this repository") from None
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):  # moto's start-up banner is not the demo's first line
        server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _demo_folder(base: Path) -> Path:
    """``base``, created with the demo's marker; a non-empty folder the demo did not make is refused."""
    if base.exists() and not (base / MARKER).exists() and (not base.is_dir() or any(base.iterdir())):
        raise ConfigError(f"--dir: {base} exists and was not made by the demo; choose a new folder "
                          "(the demo never writes into a folder it did not create)")
    (base / "outputs").mkdir(parents=True, exist_ok=True)
    (base / MARKER).write_text("made by `sidecar demo`; files in outputs/ are yours to keep\n")
    return base


def _on_disk(watch_dir: Path, key: str) -> bytes | None:
    """The bytes of the file a demo key was made from (the template is ``{pod_id}/{relpath}``), if any."""
    try:
        return (watch_dir / key.split("/", 1)[1]).read_bytes()
    except (OSError, IndexError):
        return None


def _watch_bucket(s3: Any, watch_dir: Path, expected: dict[str, bytes], *, once: bool) -> tuple[set[str], bool]:
    """Print each object as it arrives, compared with its file; until Ctrl-C, or (``once``) every sample."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seen: set[str] = set()
    deadline = time.monotonic() + ONCE_TIMEOUT_S
    ok = True
    while not stop.wait(0.25):
        for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
            key = item["Key"]
            if key in seen:
                continue
            seen.add(key)
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            want = expected.get(key, _on_disk(watch_dir, key))
            verdict = "bytes match" if body == want else "BYTES DIFFER" if want is not None else "not on disk"
            ok = ok and verdict == "bytes match"
            print(f"demo: arrived  s3://{BUCKET}/{key}  {len(body)} bytes  {verdict}")
        if once and (expected.keys() <= seen or time.monotonic() > deadline):
            break
    return seen, ok


def run_demo(folder: str, *, once: bool) -> int:
    """Run the demo; returns the exit status."""
    import boto3  # noqa: PLC0415

    from sidecar.daemon import build_daemon  # noqa: PLC0415

    signal.signal(signal.SIGIO, signal.SIG_IGN)  # lease breaks (see localfile.writer_holds) must not kill us
    base = _demo_folder(Path(folder).resolve())
    state = Path(tempfile.mkdtemp(prefix="sidecar-demo-state-"))  # the S3 server starts empty: so does the journal
    server, endpoint = _start_s3()
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="demo",
        aws_secret_access_key="demo",  # noqa: S106 - the local demo server's dummy credentials
    )
    s3.create_bucket(Bucket=BUCKET)
    settings = load_settings(
        watch_dir=base / "outputs", state_dir=state, bucket=BUCKET, endpoint_url=endpoint,
        region="us-east-1", access_key_id="demo", http_host="127.0.0.1", http_port=0,
        secret_access_key="demo",  # noqa: S106 - the local demo server's dummy credentials
        pod_id="demo-pod", log_format="console",
    )
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    print(f"demo: S3 server {endpoint}, bucket {BUCKET!r}", flush=True)
    daemon = build_daemon(settings)
    daemon.start()
    print(f"demo: watching {settings.watch_dir}  (metrics: http://127.0.0.1:{daemon.http.port}/metrics; "
          f"queue: SIDECAR_HTTP_PORT={daemon.http.port} sidecar status)")
    expected: dict[str, bytes] = {}
    for n, rel in enumerate(SAMPLES):
        data = sample_png(160, 120, n)
        expected[f"demo-pod/{rel}"] = data

    def write_samples() -> None:
        for rel in SAMPLES:
            write_like_comfyui(settings.watch_dir / rel, expected[f"demo-pod/{rel}"])

    threading.Thread(target=write_samples, daemon=True).start()
    try:
        seen, ok = _watch_bucket(s3, settings.watch_dir, expected, once=once)
    finally:
        daemon.stop(deadline=time.monotonic() + 2.0)
        daemon.close()
        server.stop()
        shutil.rmtree(state, ignore_errors=True)  # made by this run, above
    missing = sorted(expected.keys() - seen)
    if missing:
        print(f"demo: missing {missing}")
    puts = daemon.registry.get_sample_value("sidecar_s3_requests_total", {"operation": "PutObject", "status": "200"})
    print(f"demo: {len(seen & expected.keys())}/{len(expected)} samples uploaded and verified, "
          f"{int(puts or 0)} PUT request(s) in all")
    return EXIT_OK if ok and not missing else EXIT_FAILURE
