"""What the numbers were measured on: the machine, the versions of every tool, the load around us."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def _first_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _py_version(module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    return _first_line([sys.executable, "-c", code])


def commit(repo: Path) -> str:
    """The last commit that touched the daemon's code (sidecar/), short form."""
    return _first_line(["git", "-C", str(repo), "log", "-1", "--format=%h", "--", "sidecar"])


def describe(tools: dict[str, str], sidecar_version: str, repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    commit_at_start = commit(repo)
    status = ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", "sidecar"]
    dirty = subprocess.run(status, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "machine": f"{os.cpu_count()} CPU x {_cpu_model()}, {_mem_total_gib():.1f} GiB RAM, "
                   f"Linux {platform.release()}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "boto3 / botocore": f"{_py_version('boto3')} / {_py_version('botocore')}",
        "rclone": _first_line([tools["rclone"], "version"], env),
        "aws": _first_line([tools["aws"], "--version"]),
        "localbucket": _py_version("localbucket"),
        "inotifywait": _first_line([tools["inotifywait"], "--help"]).replace("\n", " "),
        "sidecar": f"{sidecar_version} (sidecar/ last changed in {commit_at_start}"
                   f"{', uncommitted changes in sidecar/' if dirty else ''})",
    }


def markdown(info: dict[str, str]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in info.items())
