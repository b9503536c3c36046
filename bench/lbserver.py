"""The S3 server every tool uploads to: localbucket with its data directory on a tmpfs.

Requests are counted from localbucket's log (one line per request, ``"METHOD /bucket/key?query HTTP/1.1"``).
Each measured run gets its own bucket, so counting by bucket needs no time windows. Objects are plain
files, written to a temp name and renamed into place, so an object's mtime is the moment it was committed:
the benchmark reads the data directory instead of sending HEADs that would add requests.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import proctree
from tlsfront import TlsFront

TEMP_PREFIX = ".localbucket-"
LINE_RE = re.compile(r'"([A-Z]+) /([^/?\s]*)(/[^?\s]*)?(\?\S*)? HTTP/[\d.]+" (\d{3})')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def classify(method: str, key: str | None, query: str | None) -> str:
    """A request's S3 operation, as far as the request line tells (CopyObject looks like PutObject)."""
    q = query or ""
    if not key or key == "/":
        return {"GET": "LIST", "HEAD": "HEADBUCKET", "PUT": "CREATEBUCKET"}.get(method, method + "BUCKET")
    if method == "PUT":
        return "PART" if "uploadId" in q else "PUT"
    if method == "POST":
        return "MPU-COMPLETE" if "uploadId" in q else "MPU-CREATE"
    return method


class LocalBucket:
    """Start/stop localbucket; make and drop buckets; read objects and per-bucket request counts."""

    def __init__(self, work: Path, tmpfs_size: str = "12g") -> None:
        self.work = work
        self.tmpfs_size = tmpfs_size
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.mount: Path | None = None
        self.data = work / "s3"
        self.storage = "?"
        self.log_path = work / "localbucket.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._partial = b""
        self._counts: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()
        self.front: TlsFront | None = None  # run.py --tls: tools talk https to it, it forwards to the server
        self.ca_bundle = ""

    def put_tls_in_front(self) -> None:
        """Serve https on another port (stunnel) and make that the endpoint every tool is given."""
        self.front = TlsFront(self.work, free_port(), self.port)
        self.front.start()
        self.endpoint, self.ca_bundle = self.front.endpoint, self.front.ca_bundle

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_size},mode=755", "tmpfs", str(self.data)],
            capture_output=True, check=False,
        )
        if mounted.returncode == 0:
            self.mount = self.data
            self.storage = f"tmpfs mounted for the run (size={self.tmpfs_size})"
        else:
            self.data.rmdir()
            self.data = Path("/dev/shm") / f"bench-s3-{os.getpid()}"
            self.data.mkdir(parents=True, exist_ok=True)
            self.storage = "/dev/shm (tmpfs; mount was not permitted)"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localbucket", "--host", "127.0.0.1", "--port", str(self.port),
             str(self.data)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if not proctree.wait_until(self._listening, timeout=15):
            raise RuntimeError(f"localbucket did not start; see {self.log_path}")

    def _listening(self) -> bool:
        return proctree.listening(self.port)

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        proctree.terminate(self.proc)
        if self.mount is not None:
            subprocess.run(["umount", str(self.mount)], check=False)
        else:
            shutil.rmtree(self.data, ignore_errors=True)

    def cpu_s(self) -> float:
        assert self.proc is not None
        st = proctree.read_stat(self.proc.pid)
        return (st.cpu_s if st else 0.0) + (self.front.cpu_s() if self.front is not None else 0.0)

    # buckets and objects -------------------------------------------------------------------------
    def new_bucket(self, name: str) -> str:
        """Create a bucket directly on disk (no request is made, so none is counted)."""
        bucket = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63]
        shutil.rmtree(self.data / bucket, ignore_errors=True)
        (self.data / bucket).mkdir()
        return bucket

    def drop_bucket(self, bucket: str) -> None:
        shutil.rmtree(self.data / bucket, ignore_errors=True)

    def bucket_dir(self, bucket: str) -> Path:
        return self.data / bucket

    def objects(self, bucket: str) -> dict[str, tuple[int, float]]:
        """key -> (size, commit time) for every committed object in ``bucket``."""
        out: dict[str, tuple[int, float]] = {}
        stack = [(self.data / bucket, "")]
        while stack:
            folder, prefix = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), f"{prefix}{entry.name}/"))
                else:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    out[prefix + entry.name] = (st.st_size, st.st_mtime)
        return out

    def arrived(self, bucket: str, expected: dict[str, int]) -> tuple[int, dict[str, float]]:
        """How many expected keys are in the bucket at their full size, and their commit times."""
        found = self.objects(bucket)
        times = {k: found[k][1] for k, size in expected.items() if k in found and found[k][0] == size}
        return len(times), times

    # request counting ----------------------------------------------------------------------------
    def _read_log(self) -> None:
        with self._lock, self.log_path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset += len(chunk)
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            for raw in lines:
                m = LINE_RE.search(raw.decode(errors="replace"))
                if m:
                    method, bucket, key, query, _status = m.groups()
                    op = classify(method, key, query)
                    self._counts.setdefault(bucket, Counter())[op] += 1

    def requests(self, bucket: str) -> Counter[str]:
        """Requests the server has logged for ``bucket`` so far, by operation."""
        self._read_log()
        with self._lock:
            return Counter(self._counts.get(bucket, Counter()))
