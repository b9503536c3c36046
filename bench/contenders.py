"""The tools under test, each started the way a user would run it, in its own process session.

Watching tools run for the whole measurement and pick files up by themselves:
  inotify      `inotifywait -m -r -e close_write` piped into a loop that starts one boto3 process per file
  rclone       `rclone copy --transfers 8` in a `while true; ...; sleep 1` loop (defaults, see below)
  rclone-fast  the same with `--no-check-dest --s3-no-head`
  rclone-smart the same with the flags a knowledgeable user sets (RCLONE_SMART)
  aws-cp       `aws s3 cp --recursive` in a loop (8 concurrent requests)
  aws-sync     `aws s3 sync` in a loop (8 concurrent requests)
  sidecar      `python -m sidecar run`
The ceilings are not watchers: `boto3` and `sidecar-store` (the daemon's own request code) upload files
already on disk from one process with 8 threads (peers/boto3_pool.py).

rclone "defaults" carries one flag, `--no-update-modtime`: localbucket stores no user metadata, so rclone
cannot read back the mtime it stored and, without the flag, would server-side copy every already-uploaded
file on every pass to "update" it — traffic that R2 would never see. With it, a pass costs what it costs
on R2: one LIST per 1000 keys plus a HEAD per existing file to read its mtime.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import proctree
from lbserver import LocalBucket, free_port

SIDECAR_READY_EVENT = "scan_completed"
# What a user who read rclone's S3 docs runs: one LIST per 1000 keys (--fast-list), compare against the
# listing's LastModified instead of a HEAD per object (--update --use-server-modtime --s3-no-head), no
# bucket probe. One request per new file, and a LIST per pass.
RCLONE_SMART = "--fast-list --update --use-server-modtime --s3-no-head --s3-no-check-bucket"
CEILING_MODES = {"boto3": "put", "boto3-md5": "put-md5", "sidecar-store": "sidecar-store"}


@dataclass
class Ctx:
    """What every workload needs: where things are and how to reach the server."""

    repo: Path
    bench: Path
    work: Path
    server: LocalBucket
    quick: bool
    python: str = sys.executable
    aws: str = ""
    rclone: str = ""
    inotifywait: str = ""
    sidecar_env: dict[str, str] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",  # localbucket checks no credentials
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=str(self.work / "aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.work / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            RCLONE_CONFIG=str(self.work / "no-rclone.conf"),
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ENDPOINT=self.server.endpoint,
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="bench",
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="bench",
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
            BENCH_ENDPOINT=self.server.endpoint,
        )
        env.pop("AWS_CA_BUNDLE", None)  # breaks rclone (FIELD-NOTES §5); plain http needs no CA bundle
        if self.server.ca_bundle:  # run.py --tls: botocore, the aws CLI and the daemon trust the bench's CA
            env["AWS_CA_BUNDLE"] = self.server.ca_bundle
        return env

    def write_tool_configs(self) -> None:
        # An on-the-fly aws config (never the user's): path-style URLs, 8 concurrent requests like the others.
        (self.work / "aws-config").write_text(
            "[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n  max_concurrent_requests = 8\n"
        )


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    kind: str  # "watch" | "ceiling"


PEERS = {
    p.name: p
    for p in [
        Peer("boto3", "raw boto3 put_object x8 (ceiling)", "ceiling"),
        Peer("boto3-md5", "raw boto3 put_object x8 + Content-MD5, R2-safe", "ceiling"),
        Peer("sidecar-store", "the daemon's own PUT path (S3Store.put) x8, no daemon (ceiling)", "ceiling"),
        Peer("sidecar", "sidecar daemon", "watch"),
        Peer("rclone", "rclone copy loop (defaults)", "watch"),
        Peer("rclone-fast", "rclone copy loop --no-check-dest --s3-no-head", "watch"),
        Peer("rclone-smart", "rclone copy loop, knowledgeable (--fast-list --update --use-server-modtime "
                             "--s3-no-head --s3-no-check-bucket)", "watch"),
        Peer("aws-cp", "aws s3 cp --recursive loop", "watch"),
        Peer("aws-sync", "aws s3 sync loop", "watch"),
        Peer("inotify", "inotifywait + 1 python3 process per file", "watch"),
    ]
}


def shell_loop(command: str) -> str:
    return f"while true; do {command}; sleep 1; done"


def watch_command(ctx: Ctx, peer: str, watch: Path, bucket: str) -> str:
    w, ep = shlex.quote(str(watch)), ctx.server.endpoint
    rclone = f"{ctx.rclone} copy {w} bench:{bucket} --transfers 8 -q"
    if ctx.server.ca_bundle:  # rclone is given the CA itself (it must not see AWS_CA_BUNDLE)
        rclone = f"env -u AWS_CA_BUNDLE {rclone} --ca-cert {shlex.quote(ctx.server.ca_bundle)}"
    aws = f"{ctx.aws} --endpoint-url {ep} s3"
    commands = {
        "rclone": shell_loop(f"{rclone} --no-update-modtime"),
        "rclone-fast": shell_loop(f"{rclone} --no-check-dest --s3-no-head"),
        "rclone-smart": shell_loop(f"{rclone} {RCLONE_SMART}"),
        "aws-cp": shell_loop(f"{aws} cp --recursive {w} s3://{bucket}/ --only-show-errors"),
        "aws-sync": shell_loop(f"{aws} sync {w} s3://{bucket}/ --only-show-errors"),
        "inotify": (
            f"{ctx.inotifywait} -m -r -q -e close_write --format %w%f {w} | "
            f"while IFS= read -r f; do {ctx.python} {ctx.bench / 'peers' / 'upload_one.py'} \"$f\" & done"
        ),
    }
    return commands[peer]


class Running:
    """A started tool: its session leader, log, and a stop that ends the whole session."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.log = log

    def cpu_s(self) -> float:
        return proctree.cpu_s(self.pid)

    def kill_session(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        for p in proctree.session(self.pid):  # members that left the process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)

    def stop(self, grace: float = 6.0) -> None:
        if self.popen.poll() is None:
            self.kill_session(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        self.kill_session(signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait()

    def log_has(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except FileNotFoundError:
            return False


def start_watcher(
    ctx: Ctx, peer: str, watch: Path, bucket: str, state: Path, *, workers: int = 0, ready_s: float = 60.0
) -> Running:
    """Start a watching tool on ``watch`` uploading into ``bucket``; return once it is ready."""
    running = spawn_watcher(ctx, peer, watch, bucket, state, workers=workers)
    if peer == "sidecar":
        popen, log = running.popen, running.log
        ready = proctree.wait_until(
            lambda: running.log_has(SIDECAR_READY_EVENT) or popen.poll() is not None, ready_s
        )
        if popen.poll() is not None or not ready:
            running.stop()
            raise RuntimeError(f"sidecar did not become ready: {log.read_text(errors='replace')[-2000:]}")
    else:
        time.sleep(1.0)  # inotifywait sets its watches / the loop finishes its first (empty) pass
    return running


def spawn_watcher(ctx: Ctx, peer: str, watch: Path, bucket: str, state: Path, *, workers: int = 0) -> Running:
    """Start a watching tool and return at once."""
    log = state / f"{peer}.log"
    state.mkdir(parents=True, exist_ok=True)
    env = ctx.base_env()
    env.update(BENCH_BUCKET=bucket, BENCH_WATCH_DIR=str(watch))
    if peer == "sidecar":
        env.update(sidecar_env(ctx, watch, bucket, state, workers=workers))
        argv = [ctx.python, "-m", "sidecar", "run"]
    else:
        argv = ["bash", "-c", watch_command(ctx, peer, watch, bucket)]
    popen = subprocess.Popen(
        argv, cwd=ctx.repo, env=env, stdin=subprocess.DEVNULL, stdout=log.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    return Running(peer, popen, log)


def sidecar_env(ctx: Ctx, watch: Path, bucket: str, state: Path, *, workers: int) -> dict[str, str]:
    env = {
        "PYTHONPATH": str(ctx.repo),
        "SIDECAR_WATCH_DIR": str(watch),
        "SIDECAR_STATE_DIR": str(state / "sidecar-state"),
        "SIDECAR_BUCKET": bucket,
        "SIDECAR_ENDPOINT_URL": ctx.server.endpoint,
        "SIDECAR_ACCESS_KEY_ID": "bench",
        "SIDECAR_SECRET_ACCESS_KEY": "bench",
        "SIDECAR_REGION": "us-east-1",
        "SIDECAR_HTTP_HOST": "127.0.0.1",
        "SIDECAR_HTTP_PORT": str(free_port()),
        "SIDECAR_KEY_TEMPLATE": "{relpath}",  # same keys as rclone/aws produce
        "SIDECAR_POD_ID": "bench",
        "SIDECAR_LOG_FORMAT": "json",
    }
    if workers:
        env["SIDECAR_WORKERS"] = str(workers)
    env.update(ctx.sidecar_env)  # --sidecar-env overrides
    return env
