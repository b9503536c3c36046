"""The built image, run for real: one container per :class:`Pod`, on the host network, /workspace bound
to a host folder (so the test reads what ComfyUI wrote), talking to servers on 127.0.0.1 only.

``.ci/run`` builds the image on a private dockerd and exports ``SIDECAR_TEST_IMAGE`` and ``DOCKER_HOST``
(and ``SIDECAR_TEST_DOCKER``, the client binary). See tests/container/.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from support.e2e import md5_b64
from support.proxy import R2Proxy
from support.s3server import S3Server, free_port
from support.waiting import wait_until

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Docker:
    def __init__(self, binary: str, image: str) -> None:
        self.binary, self.image = binary, image

    def __call__(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=timeout, check=check)


class Pod:
    """One container of the image with a ComfyUI stand-in and the sidecar, like a RunPod pod."""

    def __init__(
        self,
        docker: Docker,
        workspace: Path,
        env: dict[str, str],
        *,
        user: str | None = None,
        image: str | None = None,
        volumes: tuple[str, ...] = (),
    ) -> None:
        self.docker, self.workspace, self.user = docker, workspace, user
        self.image = image or docker.image
        self.volumes = volumes
        self.name = f"sidecar-test-{uuid.uuid4().hex[:10]}"
        self.comfy_port, self.http_port = free_port(), free_port()
        self.env = {
            "SIDECAR_HTTP_HOST": "127.0.0.1",
            "SIDECAR_HTTP_PORT": str(self.http_port),
            "COMFYUI_CMD": f"python /comfyui/main.py --listen 127.0.0.1 --port {self.comfy_port}",
            "COMFY_PORT": str(self.comfy_port),  # the template stand-in's /start.sh starts ComfyUI itself
            **env,
        }
        self.started = False

    def run_args(self, *command: str, detach: bool = True) -> list[str]:
        args = ["run", "--network", "host", "--name", self.name, "-v", f"{self.workspace}:/workspace",
                "--health-interval", "1s", "--health-start-period", "60s"]
        if detach:
            args.append("-d")
        if self.user is not None:
            args += ["--user", self.user]
        for volume in self.volumes:
            args += ["-v", volume]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        return [*args, self.image, *command]

    def start(self, *command: str) -> Pod:
        self.docker(*self.run_args(*command), check=True)
        self.started = True
        return self

    def restart(self) -> Pod:
        self.docker("start", self.name, check=True)
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        """Until the sidecar answers /healthz and the stand-in accepts prompts."""
        wait_until(lambda: (self.get("/healthz")[0] == 200 and self._comfy_up()) or self.state()["Status"] != "running",
                   timeout=timeout, interval=0.2, message=self.logs)
        assert self.state()["Status"] == "running", self.logs()

    def _comfy_up(self) -> bool:
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.comfy_port}/history/none", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, (code, body)
        data: dict[str, Any] = json.loads(body)
        return data

    def prompt(self, outputs: list[dict[str, Any]], *, date_folder: bool = False) -> str:
        body = json.dumps({"outputs": outputs, "date_folder": date_folder}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.comfy_port}/prompt", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with _OPENER.open(request, timeout=10) as resp:
            prompt_id: str = json.load(resp)["prompt_id"]
        return prompt_id

    def history(self, prompt_id: str) -> dict[str, Any]:
        with _OPENER.open(f"http://127.0.0.1:{self.comfy_port}/history/{prompt_id}", timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def wait_prompt(self, prompt_id: str, timeout: float = 120) -> list[str]:
        done = wait_until(lambda: (h := self.history(prompt_id))["done"] and h, timeout=timeout, interval=0.1)
        files: list[str] = done["files"]
        return files

    def state(self) -> dict[str, Any]:
        out = self.docker("inspect", "--format", "{{json .State}}", self.name, check=True)
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def exec(self, *command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", *(["--user", user] if user else []), self.name, *command)

    def stop(self, timeout_s: int = 5) -> tuple[float, int]:
        """``docker stop -t timeout_s``; (seconds it took, the container's exit code)."""
        began = time.monotonic()
        self.docker("stop", "-t", str(timeout_s), self.name, check=True, timeout=timeout_s + 30)
        took = time.monotonic() - began
        return took, int(self.state()["ExitCode"])

    def logs(self) -> str:
        out = self.docker("logs", self.name)
        return (out.stdout + out.stderr)[-6000:]

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.docker("logs", self.name).stdout.splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def remove(self) -> None:
        if self.started:
            self.docker("rm", "-f", "-v", self.name)


def report(name: str, **figures: object) -> None:
    """Print the figures, and append them to $SIDECAR_IMAGE_REPORT (.ci/run shows that file at the end)."""
    line = json.dumps({"test": name, **figures})
    print(f"image-suite: {line}", flush=True)
    if path := os.environ.get("SIDECAR_IMAGE_REPORT"):
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def on_disk(pod: Pod, outputs: str = "outputs") -> dict[str, bytes]:
    """``{key: bytes}`` of ComfyUI's outputs under the pod's workspace (default key template, pod id "pod")."""
    out = pod.workspace / outputs
    return {f"pod/{p.relative_to(out)}": p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}  # the sidecar's own canary is not an output


MANIFESTS = "pod/_jobs/"  # the sidecar's job manifests (SIDECAR_MANIFEST_KEY's default), one per prompt


def check_bucket(pod: Pod, s3: S3Server, proxy: R2Proxy, bucket: str, outputs: str = "outputs") -> dict[str, int]:
    """The bucket holds exactly the files on disk, byte for byte, and one manifest per prompt at most, each
    listing stored files with their MD5s; every PUT body was a whole final file."""
    files = on_disk(pod, outputs)
    objects = s3.objects(bucket)
    manifests = {k: json.loads(v) for k, v in objects.items() if k.startswith(MANIFESTS)}
    assert {k: v for k, v in objects.items() if k not in manifests} == files
    for manifest in manifests.values():
        for f in manifest["files"]:
            assert f["status"] == "stored" and hashlib.md5(files[f["key"]]).hexdigest() == f["md5"], f
    puts = [r for r in proxy.puts() if not (r.key or "").startswith(MANIFESTS)]
    accepted = Counter(r.key for r in puts if r.ok)
    assert accepted == dict.fromkeys(files, 1), "a key accepted more than one PUT"
    prefixes = 0
    for req in puts:  # the proxy rejects a body whose MD5 is not its Content-MD5 (BadDigest)
        final = files.get(req.key or "")
        assert final is not None, f"PUT of a key that is no file: {req.key}"
        if req.headers.get("content-md5") != md5_b64(final) or (req.ok and req.payload_len != len(final)):
            prefixes += 1
    assert prefixes == 0, f"{prefixes} PUTs carried other bytes than the final file (a prefix was uploaded)"
    return {"files": len(files), "puts": len(puts), "accepted": sum(accepted.values()), "prefix_puts": prefixes,
            "manifests": len(manifests)}
