"""The malloc arena cap: a daemon's upload threads share two glibc arenas instead of one each."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Six threads that each allocate and free 200 KB buffers, then glibc's own report of its arenas.
SCRIPT = """
import ctypes, sys, threading
from sidecar.memory import limit_malloc_arenas
capped = limit_malloc_arenas() if sys.argv[1] == "cap" else False
go = threading.Barrier(6)
def work():
    go.wait()
    for _ in range(200):
        bufs = [bytearray(200_000) for _ in range(4)]
        del bufs
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
print(capped, flush=True)
ctypes.CDLL(None).malloc_stats()  # to stderr: one "Arena N:" line per arena
"""


def _arenas(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    return done.stdout.strip(), sum(1 for line in done.stderr.splitlines() if line.startswith("Arena "))


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_stats"), reason="not glibc")
def test_threads_share_two_arenas_when_capped() -> None:
    capped, arenas = _arenas("cap")
    assert capped == "True"
    assert 1 <= arenas <= 2
    _, uncapped = _arenas("plain")
    assert uncapped > 2, "without the cap each thread gets an arena of its own (else this test proves nothing)"
