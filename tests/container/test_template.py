"""deploy/runpod: the sidecar added to a pod of an existing template without rebuilding its image.

The template is tests/container/template: a /start.sh in the shape of RunPod's (pre/post hooks, SSH and
Jupyter stand-ins, ComfyUI writing as root into /workspace/ComfyUI/output, sleep infinity). The repository
is mounted read-only at /src, as a checkout on the pod would be.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from support.container import Pod, check_bucket, report
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.unprivileged import shared_folder
from support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
SOURCE = f"{REPO}:/src:ro"
OUTPUTS = "ComfyUI/output"
START_COMMAND = ("bash", "/workspace/.sidecar-runtime/bin/pod-start")
STOP_RUNS = 5
SECRET_MARKERS = ("pod-secret-marker-3f1e9a", "AKIDPODTESTKEY0001")


def processes(pod: Pod) -> str:
    """Every process's argv line and environment, read by a shell that carries no environment itself."""
    return pod.exec("env", "-i", "/bin/sh", "-c",
                    "for p in /proc/[0-9]*; do echo \"== $p $(tr '\\0' ' ' < $p/cmdline)\"; "
                    "tr '\\0' '\\n' < $p/environ; done 2>/dev/null").stdout


def argv_of(found: str, pid: int) -> str:
    return next((line for line in found.splitlines() if line.startswith(f"== /proc/{pid} ")), "")


def wait_all_uploaded(pod: Pod, s3: S3Server, bucket: str, count: int) -> None:
    wait_until(lambda: len(s3.keys(bucket)) >= count, timeout=120, interval=0.2, message=pod.logs)
    wait_until(lambda: (s := pod.status())["counts"]["pending"]["files"] + s["inflight"] + s["settling"] == 0,
               timeout=60, interval=0.2)


@pytest.mark.slow
def test_install_into_a_running_template_pod_keeps_its_services_and_uploads(
    make_pod: Callable[..., Pod], template_image: str, s3_server: S3Server, r2_proxy_http: R2Proxy, bucket: str
) -> None:
    """install.sh in a running pod: isolated venv on the volume, /post_start.sh hook, uploads; SSH/Jupyter live."""
    pod = make_pod(image=template_image, volumes=(SOURCE,)).start()
    wait_until(lambda: "pod is ready to use" in pod.logs() and pod._comfy_up(), timeout=60, interval=0.2)
    began = time.monotonic()
    installed = pod.exec("bash", "/src/deploy/runpod/install.sh")
    took = time.monotonic() - began
    assert installed.returncode == 0, installed.stdout + installed.stderr
    pod.wait_ready()

    files = pod.wait_prompt(pod.prompt([{"kind": "video", "prefix": "clip", "count": 1, "bytes": 1_000_000},
                                        {"kind": "png", "prefix": "ComfyUI", "count": 5}]))
    wait_all_uploaded(pod, s3_server, bucket, len(files))
    figures = check_bucket(pod, s3_server, r2_proxy_http, bucket, OUTPUTS)

    found = processes(pod)
    assert "/start.sh" in argv_of(found, 1), "the template's start script stays PID 1"
    assert "sshd-standin" in found and "jupyter-standin" in found
    assert pod.status()["writer_check"]["uid"] != 0, "the sidecar runs as its own user"
    assert any(line.get("event") == "daemon_started" for line in pod.log_lines()), "its log is the pod's log"
    venv = pod.exec("sh", "-c", "ls /workspace/.sidecar-runtime/venv/bin").stdout.split()
    assert "sidecar" in venv and "supervisord" in venv and "pip" not in venv

    again = pod.exec("bash", "/src/deploy/runpod/install.sh", "--no-start")
    assert again.returncode == 0, again.stderr
    hook = pod.exec("cat", "/post_start.sh").stdout
    assert hook.count("comfyui-r2-sidecar") == 1, hook  # a second install adds no second line
    report("template_hook", install_s=round(took, 1), **figures)


@pytest.mark.slow
def test_start_command_mode_behaves_like_the_image_across_stops_and_resets(
    make_pod: Callable[..., Pod], template_image: str, s3_server: S3Server, r2_proxy_http: R2Proxy, bucket: str
) -> None:
    """pod-start as the start command: PID 1 is the sidecar's entrypoint, stops exit 0 in time, no secret leaks,
    and a new container on the same volume (RunPod's container-disk reset) runs without reinstalling."""
    workspace = shared_folder("sidecar-template-")
    setup = make_pod(image=template_image, workspace=workspace, volumes=(SOURCE,))
    out = setup.docker(*setup.run_args("bash", "/src/deploy/runpod/install.sh", "--no-hook", "--no-start",
                                       detach=False), timeout=300)
    setup.started = True
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    pod = make_pod(image=template_image, workspace=workspace)
    r2_proxy_http.delay(0.8)  # uploads are in flight when the stop comes
    took: list[float] = []
    codes: list[int] = []
    for run in range(STOP_RUNS):
        if run == 0:
            pod.start(*START_COMMAND)
        else:
            pod.restart()
        pod.wait_ready()
        if run == 0:
            found = processes(pod)
            assert "sidecar-entrypoint" in argv_of(found, 1)
            assert "sshd-standin" in found and "jupyter-standin" in found, "the template's own start ran"
            assert [m for m in SECRET_MARKERS if m in found] == []
        pod.wait_prompt(pod.prompt([{"kind": "png", "prefix": f"run{run}/ComfyUI", "count": 6}]))
        wait_until(lambda: pod.status()["inflight"] > 0, timeout=30, interval=0.05)
        seconds, code = pod.stop(5)
        took.append(seconds)
        codes.append(code)
    r2_proxy_http.delay(0)

    reset = make_pod(image=template_image, workspace=workspace).start(*START_COMMAND)  # a new container disk
    reset.wait_ready()
    wait_all_uploaded(reset, s3_server, bucket, STOP_RUNS * 6)
    figures = check_bucket(reset, s3_server, r2_proxy_http, bucket, OUTPUTS)
    report("template_start_command", runs=STOP_RUNS, exit_codes=dict(Counter(codes)),
           median_s=round(statistics.median(took), 2), max_s=round(max(took), 2), **figures)
    assert codes == [0] * STOP_RUNS
    assert max(took) < 5.0
