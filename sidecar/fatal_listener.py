"""A supervisord event listener that ends the pod when the sidecar cannot be started.

supervisord gives up on a program after ``startretries`` failed starts (state FATAL) and then idles: the
container stays up, ComfyUI keeps writing, and nothing uploads them until a person restarts the pod. This
listener (``[eventlistener:sidecar-fatal]`` in supervisord.conf, ``python -m sidecar.fatal_listener``)
waits for ``PROCESS_STATE_FATAL`` of the watched program, writes a marker file and sends SIGTERM to
supervisord; the entrypoint, PID 1, then exits non-zero (see entrypoint.sh), so the pod restarts.

It speaks supervisord's documented event-listener protocol on stdin/stdout: ``READY``, a header line,
a payload of ``len`` bytes, ``RESULT 2\\nOK``. Stdlib only; never writes anything else to stdout.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

WATCHED = "sidecar"


def _fields(line: str) -> dict[str, str]:
    return dict(item.split(":", 1) for item in line.split() if ":" in item)


def handle(event: str, payload: str, marker: Path, stop: Callable[[], None], watched: str = WATCHED) -> bool:
    """React to one event; True when it was the watched program's FATAL (marker written, stop called)."""
    data = _fields(payload.split("\n", 1)[0])
    if event != "PROCESS_STATE_FATAL" or data.get("processname") != watched:
        return False
    marker.write_text(f"{watched} entered FATAL: supervisord gave up starting it\n", encoding="utf-8")
    print(f"sidecar-fatal: {watched} entered FATAL; stopping the pod so that it restarts", file=sys.stderr,
          flush=True)
    stop()
    return True


def serve(stdin: TextIO, stdout: TextIO, marker: Path, stop: Callable[[], None]) -> None:
    """The listener loop: until stdin ends."""
    while True:
        stdout.write("READY\n")
        stdout.flush()
        header = stdin.readline()
        if not header:
            return
        headers = _fields(header)
        payload = stdin.read(int(headers.get("len", "0")))
        handle(headers.get("eventname", ""), payload, marker, stop)
        stdout.write("RESULT 2\nOK")
        stdout.flush()


def main() -> int:
    run_dir = Path(os.environ.get("SUPERVISOR_RUN_DIR", "/run/sidecar-supervisor"))
    supervisord = os.getppid()
    serve(sys.stdin, sys.stdout, run_dir / "sidecar-fatal", lambda: os.kill(supervisord, signal.SIGTERM))
    return 0


if __name__ == "__main__":
    sys.exit(main())
