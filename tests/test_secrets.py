"""No secret ever leaves the process: marker values in the three secret settings are searched for in every
output of full runs of every command (real subprocesses, real S3 server behind the R2 proxy, DEBUG logs)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from support.daemon import DaemonProcess, sidecar_env
from support.localhttp import http_get
from support.proxy import R2Proxy
from support.waiting import wait_until

KEY_ID = f"AKIDMARKER{uuid.uuid4().hex[:10].upper()}"
SECRET_KEY = f"secretmarker/{uuid.uuid4().hex}+x"
TOKEN = f"tokenmarker-{uuid.uuid4().hex}"
MARKERS = (KEY_ID, SECRET_KEY, TOKEN)


class Outputs:
    """Everything the processes and endpoints said, by where it came from."""

    def __init__(self) -> None:
        self.seen: dict[str, bytes] = {}

    def add(self, where: str, data: bytes | str) -> None:
        self.seen[where] = data.encode() if isinstance(data, str) else data

    def leaks(self) -> list[tuple[str, str]]:
        return [(where, marker) for where, data in self.seen.items() for marker in MARKERS
                if marker.encode() in data]


def _get(port: int, path: str, token: str | None) -> tuple[int, bytes]:
    return http_get(f"http://127.0.0.1:{port}{path}", token)


def _command(env: dict[str, str], log_dir: Path, outputs: Outputs, *args: str) -> tuple[int, str, str]:
    """Run one ``sidecar`` command to completion and record its output."""
    proc = DaemonProcess(env, args, log_dir=log_dir).start()
    code = proc.wait(timeout=30)
    name = " ".join(args)
    outputs.add(f"{name} [{log_dir.name}] stdout", proc.raw_stdout())
    outputs.add(f"{name} [{log_dir.name}] stderr", proc.raw_stderr())
    return code, proc.raw_stdout(), proc.raw_stderr()


@pytest.fixture
def secret_env(tmp_path: Path, r2_proxy: R2Proxy, bucket: str) -> dict[str, str]:
    """A daemon environment whose key id, secret key and HTTP token are marker values; DEBUG logging."""
    r2_proxy.rules.signing_secret = SECRET_KEY  # the proxy verifies SigV4 with the daemon's (marker) secret
    return sidecar_env(
        tmp_path, r2_proxy.endpoint, bucket, ca_bundle=r2_proxy.ca_bundle, access_key_id=KEY_ID,
        secret_access_key=SECRET_KEY, http_token=TOKEN, log_level="DEBUG", max_attempts=1,
    )


def test_a_full_run_never_shows_a_secret(secret_env: dict[str, str], r2_proxy: R2Proxy, tmp_path: Path) -> None:
    """Uploads, a failure quoting the key id, /status, /metrics, status, config and check never show a secret."""
    outputs = Outputs()
    # The store's error message repeats the access key id, as S3's InvalidAccessKeyId does; an object-scope
    # AccessDenied (HeadBucket still works) parks this one file with that message.
    r2_proxy.fail_next(1, status=403, code="AccessDenied",
                       message=f"The AWS Access Key Id {KEY_ID} you provided does not exist in our records.",
                       when=lambda r: (r.key or "").endswith("rejected.png"))
    with DaemonProcess(secret_env, log_dir=tmp_path / "run") as daemon:
        (started,) = wait_until(lambda: daemon.events("http_started"), timeout=20, message=daemon.output)
        port = int(started["port"])
        root = Path(secret_env["SIDECAR_WATCH_DIR"])
        for name in ("one.png", "two.png", "rejected.png"):
            (root / name).write_bytes(name.encode() * 100)
        wait_until(lambda: len(daemon.events("upload_succeeded")) == 2 and daemon.events("upload_failed"),
                   message=daemon.output)
        cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
        outputs.add("/proc/<pid>/cmdline", cmdline)
        assert b"sidecar" in cmdline
        for path in ("/metrics", "/status", "/readyz", "/healthz", "/nope"):
            status, body = _get(port, path, TOKEN)
            assert status in (200, 503, 404), (path, status)
            outputs.add(f"GET {path}", body)
            outputs.add(f"GET {path} with a wrong token", _get(port, path, TOKEN[:-1])[1])
        status_doc = json.loads(outputs.seen["GET /status"])
        (failure,) = status_doc["recent_failures"]
        assert "does not exist" in failure["error"] and "**********" in failure["error"], failure

        code, out, _ = _command({**secret_env, "SIDECAR_HTTP_PORT": str(port)}, tmp_path / "status", outputs,
                                "status")
        assert code == 0 and "rejected.png" in out
        code, out, _ = _command(secret_env, tmp_path / "config", outputs, "config")
        assert code == 0 and json.loads(out)["secret_access_key"] == "**********"
        code, out, _ = _command(secret_env, tmp_path / "check", outputs, "check")
        assert (code, out.startswith("ok: ")) == (0, True)
        code, _, err = _command({**secret_env, "SIDECAR_BUCKET": "no-such-bucket"}, tmp_path / "check-bad",
                                outputs, "check")
        assert code == 1 and err.startswith("sidecar: check failed")
        assert daemon.terminate(timeout=10) == 0
        outputs.add("run stdout", daemon.raw_stdout())
        outputs.add("run stderr", daemon.raw_stderr())

    (failed,) = [line for line in map(json.loads, daemon.raw_stdout().splitlines())
                 if line["event"] == "upload_failed"]
    assert failed["error_class"] == "AccessDenied" and "**********" in failed["error"]
    state = Path(secret_env["SIDECAR_STATE_DIR"])
    for state_file in sorted(state.iterdir()):
        outputs.add(f"state file {state_file.name}", state_file.read_bytes())
    assert len(outputs.seen) > 20
    assert outputs.leaks() == []


@pytest.mark.parametrize(
    ("variable", "value", "names"),
    [
        ("SIDECAR_WORKERS", "0", "SIDECAR_WORKERS"),
        ("SIDECAR_HTTP_TOKEN", f"{TOKEN} has spaces", "SIDECAR_HTTP_TOKEN"),
        ("SIDECAR_KEY_TEMPLATE", "{nope}", "SIDECAR_KEY_TEMPLATE"),
    ],
    ids=["bad-workers", "bad-token", "bad-template"],
)
def test_a_bad_config_never_shows_a_secret(
    secret_env: dict[str, str], tmp_path: Path, variable: str, value: str, names: str
) -> None:
    """run, check and config refuse an invalid setting in one line that names it and shows no secret."""
    outputs = Outputs()
    env = {**secret_env, variable: value}
    for command in ("run", "check", "config"):
        code, out, err = _command(env, tmp_path / command, outputs, command)
        if command != "run" and variable == "SIDECAR_HTTP_TOKEN":
            continue  # only the daemon validates the token's form (when it builds the HTTP endpoint)
        assert code == 2, (command, out, err)
        assert err.startswith(f"sidecar: {names}:") and err.count("\n") == 1, err
    assert outputs.leaks() == []
