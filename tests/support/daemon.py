"""Run the sidecar as a real subprocess (``python -m sidecar``) and read its JSON log lines."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
_BASE_ENV_KEEP = ("PATH", "HOME", "PYTHONPATH")


def sidecar_env(
    tmp_path: Path,
    endpoint: str,
    bucket: str,
    *,
    ca_bundle: str | Path | None = None,
    **extra: str | int | float | Path,
) -> dict[str, str]:
    """``SIDECAR_*`` variables for a daemon writing into ``bucket`` at ``endpoint``.

    ``ca_bundle`` (e.g. ``r2_proxy.ca_bundle`` for the https proxy) becomes ``AWS_CA_BUNDLE``.
    ``extra`` keys are upper-cased and prefixed with ``SIDECAR_`` unless they already carry a prefix
    (``SIDECAR_``/``AWS_``/``RUNPOD_``), so ``workers=2`` sets ``SIDECAR_WORKERS=2``.
    """
    env = {
        "SIDECAR_WATCH_DIR": str(tmp_path / "out"),
        "SIDECAR_STATE_DIR": str(tmp_path / "state"),
        "SIDECAR_BUCKET": bucket,
        "SIDECAR_ENDPOINT_URL": endpoint,
        "SIDECAR_ACCESS_KEY_ID": "testing",
        "SIDECAR_SECRET_ACCESS_KEY": "testing",
        "SIDECAR_REGION": "us-east-1",
        "SIDECAR_HTTP_PORT": "0",
        "SIDECAR_SETTLE_S": "0.1",
    }
    if ca_bundle is not None:
        env["AWS_CA_BUNDLE"] = str(ca_bundle)
    for name, value in extra.items():
        upper = name.upper()
        if not upper.startswith(("SIDECAR_", "AWS_", "RUNPOD_")):
            upper = f"SIDECAR_{upper}"
        env[upper] = str(value)
    return env


class DaemonProcess:
    """``sys.executable -m sidecar <args>`` with a clean environment and its output in log files.

    The environment is ``PATH``, ``HOME`` and ``PYTHONPATH`` from ours (the repo root is added to
    ``PYTHONPATH`` so the working tree's ``sidecar`` is imported), ``SIDECAR_LOG_FORMAT=json``, boto3
    isolated from ``~/.aws``, then ``env``. Nothing else leaks in: no ``AWS_*`` credentials, CA bundle or
    proxy settings of the host.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        args: Sequence[str] = ("run",),
        *,
        log_dir: Path | None = None,
        cwd: Path | None = None,
        python: str = sys.executable,
        user: int | None = None,
    ) -> None:
        self.args = list(args)
        self.python = python
        self.user = user  # run as this uid (and its primary gid), no supplementary groups; needs root
        self.log_dir = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="sidecar-daemon-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = self.log_dir / "stdout.log"
        self.stderr_path = self.log_dir / "stderr.log"
        self.cwd = cwd if cwd is not None else self.log_dir
        self.env = self._build_env(env)
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _build_env(env: Mapping[str, str]) -> dict[str, str]:
        base = {name: os.environ[name] for name in _BASE_ENV_KEEP if name in os.environ}
        paths = [str(REPO_ROOT)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
        base["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        base["SIDECAR_LOG_FORMAT"] = "json"
        # Hermetic boto3: never read the host's ~/.aws files or probe the EC2 metadata service.
        base["AWS_CONFIG_FILE"] = os.devnull
        base["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        base["AWS_EC2_METADATA_DISABLED"] = "true"
        base.update(env)
        return base

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> DaemonProcess:
        if self._proc is not None:
            raise RuntimeError("daemon already started")
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            drop: dict[str, Any] = {}
            if self.user is not None:
                drop = {"user": self.user, "group": pwd.getpwuid(self.user).pw_gid, "extra_groups": []}
            self._proc = subprocess.Popen(
                [self.python, "-m", "sidecar", *self.args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                **drop,
            )
        return self

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("daemon not started")
        return self._proc

    def wait(self, timeout: float | None = None) -> int:
        """Exit code; raises ``subprocess.TimeoutExpired`` if it is still running after ``timeout``."""
        return self._require().wait(timeout=timeout)

    def send_signal(self, sig: int) -> None:
        proc = self._require()
        if proc.poll() is None:
            proc.send_signal(sig)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit code; raises ``subprocess.TimeoutExpired`` if it does not exit in time."""
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL (like RunPod 5 s after SIGTERM) and reap; returns the exit code (-9)."""
        self.send_signal(signal.SIGKILL)
        return self.wait(10)

    def stop(self) -> None:
        """Best-effort cleanup: SIGTERM, then SIGKILL if it lingers."""
        if not self.is_running():
            return
        try:
            self.terminate(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def raw_stdout(self) -> str:
        return self._read(self.stdout_path)

    def raw_stderr(self) -> str:
        return self._read(self.stderr_path)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stdout line that is a JSON object, in order; other lines are skipped (see raw_stdout)."""
        out: list[dict[str, Any]] = []
        for raw in self.raw_stdout().splitlines():
            line = raw.strip()
            if not line.startswith("{"):
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue  # includes a last line still being written
            if isinstance(value, dict):
                out.append(value)
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        """JSON log lines whose ``event`` field equals ``event``."""
        return [line for line in self.log_lines() if line.get("event") == event]

    def output(self) -> str:
        """stdout and stderr together, for assertion messages."""
        return f"--- stdout ---\n{self.raw_stdout()}\n--- stderr ---\n{self.raw_stderr()}"

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
