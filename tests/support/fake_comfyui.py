"""A stand-in for ComfyUI's ``main.py`` that writes images the way ComfyUI's SaveImage does.

Run by supervisord through ``COMFYUI_CMD`` in the packaging tests. It takes ComfyUI's own flags
(``--listen``, ``--port``, ``--output-directory``; the last one required, so a supervisord.conf that
forgets to point ComfyUI at the watched folder fails the test) and then, like ComfyUI's writers
(see shared/FIELD-NOTES.md section 2):

- writes each PNG **in place**: opened on its final path, filled in 64 KiB chunks, no temp file and no
  rename, so the file is visible while it grows;
- creates a subfolder right before writing into it (``os.makedirs(..., exist_ok=True)``), so the first
  files land before any watch on that folder exists;
- names files ``<prefix>_<5-digit counter>_.png`` with counter = 1 + the highest one already in that
  folder for that prefix.

The plan comes from the environment (stdlib only; nothing else is importable under supervisord):

``FAKE_COMFYUI_PLAN``
    comma-separated ``<subfolder/prefix>:<count>`` items, e.g. ``ComfyUI:4,portraits/hero:3``.
``FAKE_COMFYUI_INTERVAL_S``
    pause between two images (default 0).
``FAKE_COMFYUI_STARTED`` / ``FAKE_COMFYUI_DONE``
    files written (outside the watched tree) when the process starts and when every image is closed;
    the second holds the JSON list of relative paths written.

Afterwards it idles like a server until it gets a signal. It logs to stderr only, so the container's
stdout carries nothing but the sidecar's JSON lines in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

CHUNK = 64 * 1024
SIDE = 160  # 160 x 160 RGB noise: ~77 KB, so each image takes two chunked writes


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png(rng: random.Random, index: int) -> bytes:
    """A valid RGB PNG of noise with ComfyUI's ``prompt`` text chunk; every call gives new bytes."""
    rows = b"".join(b"\x00" + rng.randbytes(SIDE * 3) for _ in range(SIDE))
    prompt = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": rng.getrandbits(48)}}})
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", struct.pack(">IIBBBBB", SIDE, SIDE, 8, 2, 0, 0, 0)),
            _chunk(b"tEXt", b"prompt\x00" + prompt.encode()),
            _chunk(b"tEXt", b"index\x00" + str(index).encode()),
            _chunk(b"IDAT", zlib.compress(rows, 6)),
            _chunk(b"IEND", b""),
        )
    )


def next_counter(folder: Path, prefix: str) -> int:
    """ComfyUI's rule: 1 + the highest ``<prefix>_NNNNN_`` counter present in ``folder``."""
    pattern = re.compile(re.escape(prefix) + r"_(\d{5,})_")
    highest = 0
    if folder.is_dir():
        for entry in os.listdir(folder):
            match = pattern.match(entry)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def write_in_place(path: Path, data: bytes) -> None:
    """Open the final path and fill it chunk by chunk, flushing each, as PIL's save() does."""
    with path.open("wb") as out:
        for start in range(0, len(data), CHUNK):
            out.write(data[start : start + CHUNK])
            out.flush()


def parse_plan(text: str) -> list[tuple[str, int]]:
    plan: list[tuple[str, int]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, _, count = item.rpartition(":")
        plan.append((target, int(count)))
    return plan


def run(output_dir: Path, plan: list[tuple[str, int]], interval: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    written: list[str] = []
    index = 0
    for target, count in plan:
        subfolder, _, prefix = target.rpartition("/")
        folder = output_dir / subfolder if subfolder else output_dir
        for _ in range(count):
            os.makedirs(folder, exist_ok=True)
            name = f"{prefix}_{next_counter(folder, prefix):05}_.png"
            write_in_place(folder / name, make_png(rng, index))
            written.append((folder / name).relative_to(output_dir).as_posix())
            print(f"Prompt executed: saved {written[-1]}", file=sys.stderr, flush=True)
            index += 1
            if interval:
                time.sleep(interval)  # the pace of a real sampler between two saves
    return written


def _write_marker(path: str, text: str) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--output-directory", required=True, type=Path)
    args, _unknown = parser.parse_known_args(argv)

    _write_marker(os.environ.get("FAKE_COMFYUI_STARTED", ""), json.dumps({"pid": os.getpid()}))
    print(f"fake ComfyUI: output directory {args.output_directory}", file=sys.stderr, flush=True)
    written = run(
        args.output_directory,
        parse_plan(os.environ.get("FAKE_COMFYUI_PLAN", "")),
        float(os.environ.get("FAKE_COMFYUI_INTERVAL_S", "0")),
        int(os.environ.get("FAKE_COMFYUI_SEED", "0")),
    )
    _write_marker(os.environ.get("FAKE_COMFYUI_DONE", ""), json.dumps(written))
    while True:  # a server: stays up until supervisord stops it (SIGTERM keeps its default action)
        signal.pause()


if __name__ == "__main__":
    raise SystemExit(main())
