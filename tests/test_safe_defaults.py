"""Safe by default for the person at the keyboard: what is planted in the watched folder is never written
through, and the defaults cover what a stock ComfyUI writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.e2e import World
from support.waiting import wait_until

from sidecar.config import DEFAULT_EXTENSIONS
from sidecar.filters import PathFilter


@pytest.mark.parametrize("planted", ["hardlink", "symlink-to-journal", "fifo"])
def test_the_canary_is_never_written_through_what_sits_at_its_name(world: World, planted: str) -> None:
    """A hard link to a file outside the folder, a symlink to the journal, or a FIFO at `.sidecar-canary`:
    the start neither writes through it nor hangs; the canary comes back, /healthz is 200, the outside
    file and the journal are untouched, and uploads work."""
    canary = world.out / ".sidecar-canary"
    outside = world.tmp_path / "precious.txt"
    outside.write_bytes(b"not yours")
    world.state.mkdir(parents=True, exist_ok=True)
    if planted == "hardlink":
        os.link(outside, canary)
    elif planted == "symlink-to-journal":
        canary.symlink_to(world.state / "journal.sqlite3")
    else:
        os.mkfifo(canary)
    proc = world.start()
    wait_until(lambda: world.status(proc)["watcher"]["canary"] == "ok", timeout=20, message=proc.output)
    world.path(world.remember("a.png", b"png" * 50)).write_bytes(world.written["a.png"])
    world.wait_in_bucket(["a.png"], proc)
    world.wait_idle(proc)  # the journal, a database still, records the upload
    assert world.journal()["a.png"].state == "uploaded"
    assert outside.read_bytes() == b"not yours"
    assert canary.is_file() and not canary.is_symlink() and canary.stat().st_nlink == 1


def test_default_extensions_cover_what_stock_comfyui_writes() -> None:
    """SaveImage (png), SaveAnimatedWEBP/PNG, SaveVideo (mp4, webm), SaveAudio (flac, mp3, opus), SaveLatent
    (latent), Save3D (glb): all candidates under the default extension list."""
    path_filter = PathFilter(DEFAULT_EXTENSIONS.split(","))
    for name in ("ComfyUI_00001_.png", "ComfyUI_00001_.webp", "ComfyUI_00001_.mp4", "v_00001_.webm",
                 "audio_00001_.flac", "audio_00001_.mp3", "audio_00001_.opus", "ComfyUI_00001_.latent",
                 "mesh_00001_.glb"):
        assert path_filter.skip_reason(name) is None, name


def _demo(folder: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(folder.parent)}
    return subprocess.run([sys.executable, "-m", "sidecar", "demo", "--once", "--dir", str(folder)], env=env,
                          capture_output=True, text=True, timeout=120, check=False, cwd=folder.parent)


def test_the_demo_deletes_nothing_and_compares_real_bytes(tmp_path: Path) -> None:
    """A fresh folder: the samples arrive, each 'bytes match'; the demo's own lines come first. A file the
    user dropped in stays on disk and is uploaded and compared on the next run. A non-empty folder the demo
    did not make is refused with one line (exit 2) and left as it was."""
    folder = tmp_path / "demo"
    first = _demo(folder)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.splitlines()[0].startswith("demo: S3 server")
    assert first.stdout.count("bytes match") == 4 and "DIFFER" not in first.stdout
    assert sorted(p.name for p in folder.iterdir()) == [".sidecar-demo", "outputs"]  # no journal left behind
    mine = folder / "outputs" / "mine.png"
    mine.write_bytes(b"dropped by the user")
    second = _demo(folder)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "demo-pod/mine.png  19 bytes  bytes match" in second.stdout
    assert mine.read_bytes() == b"dropped by the user"

    theirs = tmp_path / "workspace"
    (theirs / "outputs").mkdir(parents=True)
    (theirs / "outputs" / "real.png").write_bytes(b"a real output")
    refused = _demo(theirs)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "was not made by the demo" in refused.stderr
    assert (theirs / "outputs" / "real.png").read_bytes() == b"a real output"
    assert sorted(p.name for p in theirs.iterdir()) == ["outputs"]
