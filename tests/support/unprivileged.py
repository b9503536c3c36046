"""The sidecar as an unprivileged user, the way the image runs it beside a ComfyUI that runs as root.

The test interpreter usually lives where other users cannot reach it (pyenv under /root), so
:func:`build_runtime` makes a world-readable runtime: a venv of Debian's ``/usr/bin/python3`` with the
image's locked dependencies (``deploy/image-requirements.txt``, ``--require-hashes``) and a copy of the
working tree's ``sidecar`` package. :func:`shared_folder` is a folder that user can reach.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from support.daemon import REPO_ROOT

SYSTEM_PYTHON = "/usr/bin/python3"
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class Runtime:
    python: str
    pythonpath: str
    uid: int
    gid: int


def build_runtime(base: Path) -> Runtime:
    """A venv under ``base`` (made world-readable) that ``nobody`` can run the working tree's sidecar with."""
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    base.chmod(0o755)
    venv = base / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, capture_output=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--require-hashes",
         "--no-deps", "-r", str(REPO_ROOT / "deploy" / "image-requirements.txt")],
        check=True, capture_output=True,
    )
    code = base / "code"
    shutil.copytree(REPO_ROOT / "sidecar", code / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    for folder, _, _ in os.walk(base):
        Path(folder).chmod(0o755)
    return Runtime(python=str(venv / "bin" / "python"), pythonpath=str(code), uid=user.pw_uid, gid=user.pw_gid)


def shared_folder(prefix: str) -> Path:
    """A fresh folder under /tmp that every user can traverse (pytest's tmp_path is 0700 root)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder
