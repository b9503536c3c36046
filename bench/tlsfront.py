"""TLS in front of the S3 server, for the https variant of the bench (``run.py --tls``).

R2 is only reachable over https, where botocore skips the payload SHA-256 it computes over plain http and
every tool pays for encryption instead. stunnel (C, Debian's ``stunnel4``) terminates TLS on its own port
and forwards plain http to localbucket, so request counting and commit times stay as they are. The
certificates are throwaway ones from the test suite's helper (a CA and a leaf for 127.0.0.1); every tool
is given the CA: ``AWS_CA_BUNDLE`` for botocore, the aws CLI and the daemon, ``--ca-cert`` for rclone.
Its CPU is counted with the server's (not the tool's).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import proctree

REPO = Path(__file__).resolve().parent.parent


class TlsFront:
    """stunnel on 127.0.0.1:``port`` forwarding to ``backend_port``."""

    def __init__(self, work: Path, port: int, backend_port: int) -> None:
        self.work = work / "tls"
        self.backend_port = backend_port
        self.port = port
        self.endpoint = f"https://127.0.0.1:{self.port}"
        self.ca_bundle = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
        if not stunnel:
            raise RuntimeError("stunnel is not installed (bash bench/setup.sh installs Debian's stunnel4)")
        sys.path.insert(0, str(REPO))
        from tests.support.tls import make_tls_files  # noqa: PLC0415 - one generator of throwaway TLS material

        files = make_tls_files(self.work)
        self.ca_bundle = str(files.ca_bundle)
        conf = self.work / "stunnel.conf"
        conf.write_text(
            "foreground = yes\n"
            "pid =\n"
            "debug = 3\n"
            "[s3]\n"
            f"accept = 127.0.0.1:{self.port}\n"
            f"connect = 127.0.0.1:{self.backend_port}\n"
            f"cert = {files.cert_chain}\n"
            f"key = {files.key}\n"
        )
        log = (self.work / "stunnel.log").open("wb")
        self.proc = subprocess.Popen([stunnel, str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if not proctree.wait_until(self._listening, timeout=15):
            raise RuntimeError(f"stunnel did not start; see {self.work / 'stunnel.log'}")

    def _listening(self) -> bool:
        return (self.proc is None or self.proc.poll() is None) and proctree.listening(self.port)

    def stop(self) -> None:
        proctree.terminate(self.proc)

    def cpu_s(self) -> float:
        if self.proc is None:
            return 0.0
        st = proctree.read_stat(self.proc.pid)
        return st.cpu_s if st else 0.0
