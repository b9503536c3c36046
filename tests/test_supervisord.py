"""The image's process tree without Docker: entrypoint.sh → supervisord (the repo's supervisord.conf) →
the sidecar and a fake ComfyUI, all real processes, uploading to a real moto S3 server over HTTP.

Only the executables are swapped through the entrypoint's environment: ``SIDECAR_BIN`` is
``python -m sidecar`` from this checkout, ``COMFYUI_CMD`` runs ``tests/support/fake_comfyui.py``, and
``SUPERVISORD_BIN`` is the ``supervisord`` installed from PyPI next to this Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.s3server import DUMMY_KEY_ID, DUMMY_SECRET, REGION, S3Server, free_port
from support.waiting import wait_until

from sidecar.keys import path_text

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "entrypoint.sh"
CONF = REPO / "supervisord.conf"
DOCKERFILE = REPO / "Dockerfile"
FAKE_COMFYUI = REPO / "tests" / "support" / "fake_comfyui.py"
POD_ID = "testpod"
TOKEN_VAR = "SIDECAR_TEST_PACKAGING_TOKEN"  # marks every process a Stack started, for cleanup

# Generous limits: a loaded 2-core CI machine starts Python processes slowly. Waits end as soon as
# their condition holds, so these only bound a failure.
START_TIMEOUT = 60.0
UPLOAD_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
POLL = 0.1


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: pip install supervisor")
    return found


def _current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


class Stack:
    """One run of entrypoint.sh with its supervisord, logs captured to files in ``tmp``."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.stdout_path = tmp / "stdout.log"
        self.stderr_path = tmp / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def watch_dir(self) -> Path:
        return Path(self.env["SIDECAR_WATCH_DIR"])

    @property
    def run_dir(self) -> Path:
        return Path(self.env["SUPERVISOR_RUN_DIR"])

    def start(self, *args: str) -> Stack:
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [str(ENTRYPOINT), *args],
                env=self.env,
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return self

    def logs(self) -> str:
        """The captured output, for failure messages."""
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"\n--- stdout (tail) ---\n{out[-4000:]}\n--- stderr (tail) ---\n{err[-6000:]}"

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """supervisorctl through the control socket, as an operator would use it."""
        return subprocess.run(
            [_tool("supervisorctl"), "-c", str(CONF), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def program_pid(self, name: str) -> int:
        """The pid supervisord reports for a program; 0 while it is not running or not reachable."""
        if not (self.run_dir / "supervisor.sock").exists():
            return 0
        out = self.ctl("pid", f"pod:{name}").stdout.strip()  # both programs are in group "pod"
        return int(out) if out.isdigit() else 0

    def state(self, name: str) -> str:
        """supervisord's state name for a program (STARTING, RUNNING, BACKOFF, ...), or "" if unreachable."""
        if not (self.run_dir / "supervisor.sock").exists():
            return ""
        words = self.ctl("status", f"pod:{name}").stdout.split()
        return words[1] if len(words) > 1 else ""

    def wait_running(self) -> int:
        """Wait until supervisord runs both programs; returns the sidecar's pid."""
        wait_until(lambda: self.program_pid("comfyui"), START_TIMEOUT, POLL, self.logs)
        return wait_until(lambda: self.program_pid("sidecar"), START_TIMEOUT, POLL, self.logs)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM to supervisord (PID 1 in the container); its exit status and how long it took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"supervisord still running {STOP_TIMEOUT}s after SIGTERM{self.logs()}")
        return code, time.monotonic() - started

    def cleanup(self) -> None:
        """Stop supervisord if still up, then SIGKILL anything left that this stack started."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        for pid in marked_pids(self.env[TOKEN_VAR]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def marked_pids(token: str) -> list[int]:
    """Live processes whose environment carries ``token`` (supervisord's children inherit it)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


class Blackhole:
    """A TCP endpoint that accepts connections and never answers: S3 hanging mid-request."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="blackhole", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._server.close()
        for conn in self.connections:
            conn.close()


def base_env(tmp: Path, endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    """What a RunPod template would set, pointed at temporary folders and the local S3 server."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SIDECAR_", "COMFYUI_", "SUPERVISOR", "FAKE_COMFYUI_"))
        and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    # A short private folder: unix socket paths are limited to 107 bytes.
    run_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    os.rmdir(run_dir)  # the entrypoint must create it
    env.update(
        PYTHONPATH=str(REPO),
        SIDECAR_BIN=f"{sys.executable} -m sidecar",
        SIDECAR_USER=_current_user(),
        SUPERVISORD_BIN=_tool("supervisord"),
        SUPERVISORD_CONF=str(CONF),
        SUPERVISOR_RUN_DIR=run_dir,
        COMFYUI_CMD=shlex.join([sys.executable, str(FAKE_COMFYUI), "--listen", "127.0.0.1", "--port", "8188"]),
        # Neither folder exists yet: the entrypoint creates them. The space checks the conf's quoting.
        SIDECAR_WATCH_DIR=str(tmp / "comfy outputs"),
        SIDECAR_STATE_DIR=str(tmp / "state"),
        SIDECAR_SECRETS_DIR=str(tmp / "secrets"),  # not the host's /run
        SIDECAR_BUCKET=bucket,
        SIDECAR_ENDPOINT_URL=endpoint,
        SIDECAR_REGION=REGION,
        SIDECAR_ACCESS_KEY_ID=DUMMY_KEY_ID,
        SIDECAR_SECRET_ACCESS_KEY=DUMMY_SECRET,
        SIDECAR_POD_ID=POD_ID,
        SIDECAR_KEY_TEMPLATE="{pod_id}/{relpath}",
        SIDECAR_HTTP_HOST="127.0.0.1",
        SIDECAR_HTTP_PORT=str(free_port()),
        SIDECAR_WORKERS="2",
        SIDECAR_RETRY_BASE_S="0.2",
        SIDECAR_RETRY_CAP_S="2",
        FAKE_COMFYUI_STARTED=str(tmp / "comfyui.started"),
        FAKE_COMFYUI_DONE=str(tmp / "comfyui.done"),
        FAKE_COMFYUI_PLAN="",
    )
    env[TOKEN_VAR] = uuid.uuid4().hex
    env.update(extra)
    return env


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Builds Stacks in their own subfolders of tmp_path and tears every one down afterwards."""
    stacks: list[Stack] = []

    def make(name: str, env: dict[str, str]) -> Stack:
        folder = tmp_path / name
        folder.mkdir()
        stack = Stack(folder, env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.cleanup()


def written_files(stack: Stack) -> dict[str, bytes]:
    """Wait for the fake ComfyUI to finish; every file it wrote as ``{expected key: bytes}``."""
    done = Path(stack.env["FAKE_COMFYUI_DONE"])
    wait_until(done.exists, START_TIMEOUT, POLL, stack.logs)
    relpaths = json.loads(done.read_text())
    return {f"{POD_ID}/{path_text(rel.encode())}": (stack.watch_dir / rel).read_bytes() for rel in relpaths}


def assert_bucket_holds(s3: S3Server, bucket: str, expected: dict[str, bytes], stack: Stack) -> None:
    """Wait until the bucket has exactly the expected keys, then compare every object byte for byte."""
    wanted = set(expected)
    wait_until(
        lambda: wanted <= set(s3.keys(bucket)),
        UPLOAD_TIMEOUT,
        0.25,
        lambda: f"missing keys: {sorted(wanted - set(s3.keys(bucket)))}{stack.logs()}",
    )
    objects = s3.objects(bucket)
    assert set(objects) == wanted, f"unexpected keys: {sorted(set(objects) - wanted)}"
    for key, data in expected.items():
        assert objects[key] == data, f"{key}: {len(objects[key])} bytes in the bucket, {len(data)} on disk"


def healthcheck_argv() -> list[str]:
    """The Dockerfile's HEALTHCHECK command (exec form), run with this Python instead of the venv's."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, "Dockerfile has no exec-form HEALTHCHECK"
    argv: list[str] = json.loads(match.group(1))
    assert argv[:2] == ["/bin/sh", "-c"] and "env -i /opt/sidecar/bin/python" in argv[2], argv  # no secrets in it
    return [*argv[:2], argv[2].replace("/opt/sidecar/bin/python", sys.executable)]


def http_answers(port: str) -> bool:
    """True once anything answers HTTP on the sidecar's port (any status)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
def test_files_written_like_comfyui_reach_the_bucket_byte_identical(
    make_stack: Callable[..., Stack], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Under the repo's supervisord.conf, every image the fake ComfyUI writes in place lands in the bucket."""
    plan = "ComfyUI:4,portraits/hero:4,%date:yyyy-MM-dd%/ComfyUI:3,ComfyUI:2"
    stack = make_stack("run", base_env(tmp_path / "run", s3_server.endpoint, bucket, FAKE_COMFYUI_PLAN=plan))
    stack.start().wait_running()

    expected = written_files(stack)
    assert len(expected) == 13
    assert f"{POD_ID}/ComfyUI_00006_.png" in expected  # ComfyUI's counter carried on in the root folder
    assert_bucket_holds(s3_server, bucket, expected, stack)

    # The entrypoint stays PID 1 with supervisord as its child (it forwards the container's SIGTERM, and
    # exits 70 when the sidecar is FATAL) and prepared the folders; the control socket is its owner's only.
    assert stack.proc is not None
    supervisord = int((stack.run_dir / "supervisord.pid").read_text())
    ppid = int(Path(f"/proc/{supervisord}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == stack.proc.pid
    assert stat.S_IMODE(Path(stack.env["SIDECAR_STATE_DIR"]).stat().st_mode) == 0o700
    assert stat.S_IMODE(stack.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((stack.run_dir / "supervisor.sock").stat().st_mode) == 0o700
    assert "inet_http_server" not in re.sub(r"(?m)^\s*;.*$", "", CONF.read_text())

    # The image's HEALTHCHECK command passes against the running sidecar.
    probe = healthcheck_argv()
    wait_until(
        lambda: subprocess.run(probe, env=stack.env, capture_output=True, timeout=30, check=False).returncode == 0,
        START_TIMEOUT,
        0.5,
        stack.logs,
    )


@pytest.mark.slow
def test_kill_9_of_the_sidecar_is_restarted_and_loses_nothing(
    make_stack: Callable[..., Stack], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """SIGKILL of the sidecar mid-burst: supervisord restarts it and every file still reaches the bucket."""
    env = base_env(
        tmp_path / "run", s3_server.endpoint, bucket, FAKE_COMFYUI_PLAN="ComfyUI:30", FAKE_COMFYUI_INTERVAL_S="0.1"
    )
    stack = make_stack("run", env)
    stack.start().wait_running()
    # Past startsecs (RUNNING, not STARTING) and uploading: the crash of a daemon at work.
    wait_until(lambda: stack.state("sidecar") == "RUNNING", START_TIMEOUT, POLL, stack.logs)
    wait_until(lambda: s3_server.keys(bucket), UPLOAD_TIMEOUT, POLL, stack.logs)
    first = stack.program_pid("sidecar")

    os.kill(first, signal.SIGKILL)
    second = wait_until(
        lambda: stack.program_pid("sidecar") not in (0, first) and stack.program_pid("sidecar"),
        START_TIMEOUT,
        POLL,
        stack.logs,
    )
    assert second != first
    assert re.search(r"exited: sidecar \(terminated by SIGKILL", stack.stderr_text()), stack.logs()

    expected = written_files(stack)
    assert len(expected) == 30
    assert_bucket_holds(s3_server, bucket, expected, stack)


@pytest.mark.slow
def test_sigterm_drains_within_budget_and_pending_files_upload_after_restart(
    make_stack: Callable[..., Stack], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """SIGTERM with uploads hanging: the sidecar exits 0 before SIGKILL, and the next start uploads them."""
    blackhole = Blackhole()
    try:
        env = base_env(
            tmp_path / "first",
            blackhole.endpoint,
            bucket,
            FAKE_COMFYUI_PLAN="ComfyUI:6",
            SIDECAR_READ_TIMEOUT_S="60",
        )
        first = make_stack("first", env)
        first.start().wait_running()
        expected = written_files(first)
        wait_until(lambda: http_answers(env["SIDECAR_HTTP_PORT"]), START_TIMEOUT, POLL, first.logs)
        wait_until(lambda: blackhole.connections, UPLOAD_TIMEOUT, POLL, first.logs)  # a request is hanging

        code, took = first.terminate()
        log = first.stderr_text()
        assert code == 0, first.logs()
        # Exit status 0 rather than "terminated by SIGKILL": the sidecar finished inside stopwaitsecs.
        assert "stopped: sidecar (exit status 0)" in log, f"took {took:.1f}s{first.logs()}"
        assert marked_pids(env[TOKEN_VAR]) == [], "processes outlived supervisord"
        assert s3_server.keys(bucket) == []
    finally:
        blackhole.close()

    # Next start of the pod: same volume (watch and state folders), S3 reachable, ComfyUI idle.
    again = dict(
        env,
        SIDECAR_ENDPOINT_URL=s3_server.endpoint,
        FAKE_COMFYUI_PLAN="",
        FAKE_COMFYUI_DONE=str(tmp_path / "second.done"),
        SIDECAR_HTTP_PORT=str(free_port()),
    )
    again[TOKEN_VAR] = uuid.uuid4().hex
    again["SUPERVISOR_RUN_DIR"] = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    second = make_stack("second", again)
    second.start().wait_running()
    assert_bucket_holds(s3_server, bucket, expected, second)


@pytest.mark.slow
def test_sidecar_stdout_under_supervisord_is_json_lines(
    make_stack: Callable[..., Stack], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """What the sidecar prints to the container's stdout under supervisord is one JSON object per line."""
    stack = make_stack("run", base_env(tmp_path / "run", s3_server.endpoint, bucket, FAKE_COMFYUI_PLAN="ComfyUI:3"))
    stack.start().wait_running()
    assert_bucket_holds(s3_server, bucket, written_files(stack), stack)
    code, _ = stack.terminate()
    assert code == 0, stack.logs()

    lines = [line for line in stack.stdout_path.read_text().splitlines() if line.strip()]
    assert lines, stack.logs()
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stdout: {line!r}")
    assert all(isinstance(r, dict) and "event" in r and "level" in r for r in records), records[:5]
    assert any(r["event"] == "upload_succeeded" for r in records), sorted({r["event"] for r in records})
    # supervisord's own lines go to stderr, keeping stdout machine-readable.
    assert "spawned: 'sidecar'" in stack.stderr_text()


@pytest.mark.parametrize(
    ("variable", "value"), [("SIDECAR_WORKERS", "0"), ("SIDECAR_BUCKET", "")], ids=["workers", "bucket"]
)
def test_entrypoint_refuses_bad_config_before_starting_anything(
    make_stack: Callable[..., Stack], tmp_path: Path, variable: str, value: str
) -> None:
    """A bad SIDECAR_* value stops entrypoint.sh with exit 2 and one line naming it; nothing is started."""
    env = base_env(tmp_path / "run", "http://127.0.0.1:9", "some-bucket", **{variable: value})
    stack = make_stack("run", env)
    stack.start()
    assert stack.proc is not None
    code = stack.proc.wait(timeout=START_TIMEOUT)

    errors = stack.stderr_text().strip().splitlines()
    assert code == 2, stack.logs()
    # The contract's line is `SIDECAR_NAME: what is wrong`; a leading "sidecar: " is tolerated.
    assert len(errors) == 1 and re.match(rf"(sidecar: )?{variable}: \S", errors[0]), errors
    assert stack.stdout_path.read_text() == ""
    assert not stack.run_dir.exists()  # supervisord never ran: no socket, no pid file
    assert not Path(env["FAKE_COMFYUI_STARTED"]).exists()


def test_entrypoint_execs_its_arguments_instead_of_supervisord(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """With arguments, entrypoint.sh prepares the folders and execs them (here `sidecar --version`)."""
    env = base_env(tmp_path / "run", "http://127.0.0.1:9", "some-bucket")
    stack = make_stack("run", env)
    stack.start(sys.executable, "-m", "sidecar", "--version")
    assert stack.proc is not None
    assert stack.proc.wait(timeout=START_TIMEOUT) == 0, stack.logs()

    assert re.search(r"\d+\.\d+\.\d+", stack.stdout_path.read_text()), stack.logs()
    assert stack.watch_dir.is_dir()
    assert stat.S_IMODE(Path(env["SIDECAR_STATE_DIR"]).stat().st_mode) == 0o700
    assert not stack.run_dir.exists()


@pytest.mark.parametrize(("drain", "stopwait"), [("4", "5"), ("4.0", "5"), ("2.5", "4"), ("10", "11"), ("x", "5")])
def test_entrypoint_derives_stopwaitsecs_from_the_drain_timeout(tmp_path: Path, drain: str, stopwait: str) -> None:
    """supervisord's SIGKILL grace for the sidecar is ceil(SIDECAR_DRAIN_TIMEOUT_S) + 1 seconds."""
    env = base_env(tmp_path, "http://127.0.0.1:9", "some-bucket", SIDECAR_DRAIN_TIMEOUT_S=drain)
    out = subprocess.run(
        [str(ENTRYPOINT), "printenv", "SIDECAR_STOPWAITSECS"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=True,
    )
    assert out.stdout.strip() == stopwait


@pytest.mark.skipif(os.getuid() != 0, reason="only root can hand the sidecar to another user")
def test_entrypoint_falls_back_to_root_when_the_sidecar_user_is_missing(tmp_path: Path) -> None:
    """On a base image without the `sidecar` user, the entrypoint says so once and runs it as root."""
    env = base_env(tmp_path, "http://127.0.0.1:9", "some-bucket", SIDECAR_USER="no-such-user-here")
    out = subprocess.run(
        [str(ENTRYPOINT), "printenv", "SIDECAR_USER"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=True,
    )
    assert out.stdout.strip() == "root"
    assert "no-such-user-here" in out.stderr
