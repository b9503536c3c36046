"""A moto S3 server running as a real subprocess (``python -m moto.server`` through ``moto_server.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"  # moto checks no signature
REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def plain_config(**overrides: Any) -> Config:
    """Config for talking to the server directly: one attempt, short timeouts."""
    params: dict[str, Any] = {
        "retries": {"total_max_attempts": 1, "mode": "standard"},  # max_attempts would mean retries
        "connect_timeout": 2,
        "read_timeout": 10,
        "s3": {"addressing_style": "path"},
    }
    params.update(overrides)
    return Config(**params)


class S3Server:
    """``python -m moto.server`` on 127.0.0.1:<free port>; in-RAM S3 that checks no checksum.

    ``min_part_size`` is passed as ``S3_UPLOAD_PART_MIN_SIZE``: moto rejects non-final multipart parts
    below it with ``EntityTooSmall`` (default 5 MiB, like S3/R2). Tests lower it to keep data tiny.
    """

    def __init__(self, *, min_part_size: int = 5 * 1024 * 1024, start_timeout: float = 20.0) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.min_part_size = min_part_size
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._direct: S3Client | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="moto-server-"))
        self.log_path = self._log_dir / "moto.log"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, attempts: int = 3) -> S3Server:
        """Start the subprocess and poll until it answers; retries on a lost port race."""
        last_error = "not started"
        for _ in range(attempts):
            self.port = free_port(self.host)
            self._direct = None
            env = dict(os.environ)
            env["S3_UPLOAD_PART_MIN_SIZE"] = str(self.min_part_size)
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env.pop(name, None)
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).with_name("moto_server.py")), "-H", self.host, "-p",
                     str(self.port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            if self._wait_ready():
                return self
            last_error = self._tail_log()
            self.stop()
        raise RuntimeError(f"moto server did not come up: {last_error}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)  # polling interval while waiting for the port to open
        return False

    def _tail_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def reset(self) -> None:
        """Wipe all moto state (every bucket and object): ``POST /moto-api/reset``."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def client(self, config: Config | None = None) -> S3Client:
        """A boto3 S3 client with dummy credentials pointed straight at the server (no proxy)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=DUMMY_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET,
            region_name=REGION,
            config=config or plain_config(),
        )

    @property
    def direct(self) -> S3Client:
        """One shared direct client (thread-safe) for the helpers below."""
        if self._direct is None:
            self._direct = self.client()
        return self._direct

    def make_bucket(self, name: str) -> str:
        self.direct.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every key in ``bucket`` (ListObjectsV2, paginated), bypassing any proxy."""
        out: list[str] = []
        for page in self.direct.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return out

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in ``bucket`` as ``{key: bytes}``, bypassing any proxy."""
        client = self.direct
        return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in self.keys(bucket)}

    def head(self, bucket: str, key: str) -> dict[str, Any] | None:
        """HeadObject response, or None if the key does not exist."""
        try:
            return dict(self.direct.head_object(Bucket=bucket, Key=key))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    def delete_bucket(self, bucket: str) -> None:
        """Best-effort removal of a bucket with its objects and unfinished multipart uploads."""
        client = self.direct
        try:
            for key in self.keys(bucket):
                client.delete_object(Bucket=bucket, Key=key)
            for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            client.delete_bucket(Bucket=bucket)
        except ClientError:
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
