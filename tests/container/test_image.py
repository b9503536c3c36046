"""The shipped image, built by .ci/run on a debootstrapped stand-in for RunPod's base: ComfyUI (a stand-in
that writes like the real nodes) runs as root, the sidecar as the image's own user, supervisord under the
entrypoint as PID 1; every request goes through the recording R2 proxy to moto on 127.0.0.1.

Figures are printed (``-s`` or the CI log) as ``image-suite:`` JSON lines.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from support.container import MANIFESTS, Pod, check_bucket, report
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.waiting import wait_until

from sidecar.writercheck import CAP_LEASE

STOP_RUNS = 20
SECRET_MARKERS = ("pod-secret-marker-3f1e9a", "AKIDPODTESTKEY0001", "pod-token-marker-7c2d4b81",
                  "whsec_cG9kLXdlYmhvb2stbWFya2Vy", "hook-token-marker-51aa")


def comfy_outputs(videos: int, pngs: int) -> list[dict[str, object]]:
    return [{"kind": "video", "prefix": "video/clip", "count": videos, "bytes": 1_500_000},
            {"kind": "png", "prefix": "ComfyUI", "count": pngs, "bytes": 300_000}]


@pytest.mark.slow
def test_outputs_reach_the_bucket_whole_once_each_with_the_sidecar_as_its_own_user(
    make_pod: Callable[..., Pod], s3_server: S3Server, r2_proxy_http: R2Proxy, bucket: str
) -> None:
    """In place PNGs and paused videos, also in fresh date folders: byte-identical, one PUT each, no prefix."""
    pod = make_pod().start()
    pod.wait_ready()
    files = pod.wait_prompt(pod.prompt(comfy_outputs(videos=3, pngs=10)))
    files += pod.wait_prompt(pod.prompt(comfy_outputs(videos=2, pngs=6), date_folder=True))
    assert len(files) == 21
    wait_until(lambda: len(s3_server.keys(bucket)) >= 21, timeout=90, interval=0.2, message=pod.logs)
    wait_until(lambda: (s := pod.status())["counts"]["pending"]["files"] + s["inflight"] + s["settling"] == 0,
               timeout=60, interval=0.2)
    figures = check_bucket(pod, s3_server, r2_proxy_http, bucket)

    status = pod.status()
    uid = int(pod.exec("id", "-u", "sidecar").stdout)
    assert status["writer_check"]["mode"] == "events"
    assert status["writer_check"]["uid"] == uid != 0
    comfy = pod.exec("sh", "-c", "stat -c %u /workspace/outputs/ComfyUI_00001_.png").stdout.strip()
    assert comfy == "0", "the stand-in ComfyUI must write as root"
    wait_until(lambda: pod.state().get("Health", {}).get("Status") == "healthy", timeout=60, interval=0.5)
    caps = pod.exec("sh", "-c", "grep CapBnd /proc/1/status").stdout.split()[1]
    report("outputs", **figures, writer_check=status["writer_check"]["mode"], sidecar_uid=uid,
           cap_lease_in_bounding_set=bool(int(caps, 16) >> CAP_LEASE & 1), health="healthy")


@pytest.mark.slow
def test_docker_stop_with_uploads_in_flight_exits_0_within_5_s_every_time(
    make_pod: Callable[..., Pod], s3_server: S3Server, r2_proxy_http: R2Proxy, bucket: str
) -> None:
    """20 x `docker stop -t 5` mid-upload: exit 0 in time each run; later starts upload the rest, once each."""
    pod = make_pod()
    r2_proxy_http.delay(0.8)  # every request takes a while: uploads are in flight when the stop comes
    took: list[float] = []
    codes: list[int] = []
    for run in range(STOP_RUNS):
        if run == 0:
            pod.start()
        else:
            pod.restart()
        pod.wait_ready()
        prompt = pod.prompt([{"kind": "png", "prefix": f"run{run:02d}/ComfyUI", "count": 6, "bytes": 200_000}])
        pod.wait_prompt(prompt)
        wait_until(lambda: pod.status()["inflight"] > 0, timeout=30, interval=0.05)
        seconds, code = pod.stop(5)
        took.append(seconds)
        codes.append(code)
    r2_proxy_http.delay(0)
    pod.restart()
    pod.wait_ready()
    wait_until(lambda: len(s3_server.keys(bucket)) >= STOP_RUNS * 6, timeout=120, interval=0.2, message=pod.logs)
    wait_until(lambda: (s := pod.status())["counts"]["pending"]["files"] + s["inflight"] == 0, timeout=60)
    figures = check_bucket(pod, s3_server, r2_proxy_http, bucket)
    report("docker_stop", runs=STOP_RUNS, exit_codes=dict(Counter(codes)), min_s=round(min(took), 2),
           median_s=round(statistics.median(took), 2), max_s=round(max(took), 2),
           seconds=[round(t, 2) for t in took], **figures)
    assert codes == [0] * STOP_RUNS, f"exit codes {codes}: 137 means SIGKILL at Docker's deadline"
    assert max(took) < 5.0


def test_sidecar_wait_in_the_pod_returns_once_a_prompts_outputs_and_manifest_are_stored(
    make_pod: Callable[..., Pod], s3_server: S3Server, r2_proxy_http: R2Proxy, bucket: str
) -> None:
    """Jobs in the deployed shape: ComfyUI (root) reports its prompt, the sidecar (its own user) maps it."""
    pod = make_pod().start()
    pod.wait_ready()
    prompt = pod.prompt(comfy_outputs(videos=1, pngs=3))
    done = pod.exec("sidecar", "wait", prompt, "--timeout", "120")  # as in the pod's web terminal
    assert done.returncode == 0, done.stdout + done.stderr + pod.logs()
    doc = json.loads(done.stdout)
    objects = s3_server.objects(bucket)  # read right after `wait` returned: everything it promised is there
    manifest = json.loads(objects[f"pod/_jobs/{prompt}.json"])
    files = pod.history(prompt)["files"]
    assert doc["state"] == manifest["state"] == "complete"
    assert [f["path"] for f in manifest["files"]] == files
    for f in manifest["files"]:
        assert objects[f["key"]] == (pod.workspace / "outputs" / f["path"]).read_bytes()
    figures = check_bucket(pod, s3_server, r2_proxy_http, bucket)
    jobs = pod.status()["jobs"]
    report("jobs", **figures, state=doc["state"], comfyui_requests=jobs["comfyui_requests"],
           websocket=jobs["websocket"])
    assert figures["manifests"] == 1


def test_bad_configuration_exits_2_with_one_line(make_pod: Callable[..., Pod]) -> None:
    """A wrong value stops the container before anything starts: exit 2, one line naming the variable."""
    pod = make_pod(SIDECAR_WORKERS="lots")
    out = pod.docker(*pod.run_args(detach=False), timeout=60)
    pod.started = True
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SIDECAR_WORKERS" in lines[0], out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_one_off_commands_run_as_the_sidecar_user(
    make_pod: Callable[..., Pod], s3_server: S3Server, bucket: str
) -> None:
    """`docker run IMAGE sidecar scan` uploads what is there, as the sidecar's user, and exits 0."""
    pod = make_pod()
    out_dir = pod.workspace / "outputs"
    out_dir.mkdir()
    (out_dir / "old_00001_.png").write_bytes(b"\x89PNG written before the pod" * 100)
    whoami = pod.docker(*pod.run_args("id", "-un", detach=False))
    pod.started = True
    assert whoami.stdout.strip() == "sidecar", whoami
    pod.docker("rm", pod.name)
    scan = pod.docker(*pod.run_args("sidecar", "scan", detach=False), timeout=120)
    assert scan.returncode == 0, scan.stdout[-3000:] + scan.stderr[-3000:]
    assert s3_server.objects(bucket) == {"pod/old_00001_.png": (out_dir / "old_00001_.png").read_bytes()}
    assert Path(pod.workspace / ".sidecar" / "journal.sqlite3").stat().st_uid != 0


@pytest.mark.parametrize(("user", "words"), [("1000", ("uid 1000", "/etc/passwd")),
                                             ("sidecar", ("SIDECAR_STATE_DIR", "cannot be created"))])
def test_another_user_that_cannot_work_fails_with_one_line(
    make_pod: Callable[..., Pod], user: str, words: tuple[str, ...]
) -> None:
    """`docker run --user X`: a uid without a name, or a workspace it may not write, is one clear line, exit 2."""
    pod = make_pod(user=user)
    (pod.workspace / "outputs").mkdir()  # root-owned 0755: nobody but root may create the state folder
    out = pod.docker(*pod.run_args(detach=False), timeout=60)
    pod.started = True
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), out.stderr


def test_a_named_user_with_its_own_workspace_runs_everything_as_itself(
    make_pod: Callable[..., Pod], s3_server: S3Server, bucket: str
) -> None:
    """`docker run --user sidecar` on a workspace it owns: ComfyUI and the sidecar run as it, files upload."""
    pod = make_pod(user="sidecar")
    uid = int(pod.docker("run", "--rm", "--entrypoint", "id", pod.docker.image, "-u", "sidecar").stdout)
    os.chown(pod.workspace, uid, uid)
    pod.start()
    pod.wait_ready()
    files = pod.wait_prompt(pod.prompt([{"kind": "png", "prefix": "ComfyUI", "count": 3}]))
    wait_until(lambda: len([k for k in s3_server.keys(bucket) if not k.startswith(MANIFESTS)]) == len(files),
               timeout=60, interval=0.2, message=pod.logs)
    status = pod.status()
    assert status["writer_check"]["lease_own_files"] is True and status["writer_check"]["uid"] == uid


def test_a_sidecar_that_cannot_start_ends_the_pod_non_zero(make_pod: Callable[..., Pod]) -> None:
    """A busy HTTP port makes the sidecar FATAL; the container then exits 70 instead of idling."""
    pod = make_pod()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", pod.http_port))
        busy.listen()
        began = time.monotonic()
        pod.start()
        wait_until(lambda: pod.state()["Status"] == "exited", timeout=90, interval=0.5, message=pod.logs)
        took = time.monotonic() - began
    code = int(pod.state()["ExitCode"])
    report("fatal", exit_code=code, seconds_to_exit=round(took, 1))
    assert code == 70, pod.logs()
    assert "FATAL" in pod.logs()


def test_no_secret_in_comfyuis_environment_or_any_process(make_pod: Callable[..., Pod]) -> None:
    """The credentials, the token and the webhook's secret and URL live in files only the sidecar reads: no
    process's environ or argv has them."""
    pod = make_pod(SIDECAR_HTTP_TOKEN=SECRET_MARKERS[2], SIDECAR_WEBHOOK_SECRET=SECRET_MARKERS[3],
                   SIDECAR_WEBHOOK_URL=f"http://127.0.0.1:9/hook?token={SECRET_MARKERS[4]}").start()
    pod.wait_ready()
    # env -i: the inspecting shell itself must not carry the container's configured environment.
    found = pod.exec("env", "-i", "/bin/sh", "-c",
                     "for p in /proc/[0-9]*; do echo \"== $p $(tr '\\0' ' ' < $p/cmdline)\"; "
                     "tr '\\0' '\\n' < $p/environ; done 2>/dev/null").stdout
    processes = found.count("== /proc/")
    comfy = [line for line in found.splitlines() if line.startswith("== ") and "/comfyui/main.py" in line]
    assert processes >= 4 and comfy, found[:2000]
    leaked = [line[:40] for line in found.splitlines() if any(m in line for m in SECRET_MARKERS)]
    files = pod.exec("sh", "-c", "stat -c '%a %U %n' /run/sidecar-secrets/*").stdout.split("\n")
    report("secrets", processes_checked=processes, secrets_found=len(leaked), secret_files=len([f for f in files if f]))
    assert leaked == []
    assert all(line.startswith("600 sidecar ") for line in files if line), files
    assert pod.exec("cat", "/run/sidecar-secrets/sidecar_http_token", user="1000").returncode != 0


@pytest.mark.slow
def test_retention_frees_root_written_outputs_in_every_folder(
    make_pod: Callable[..., Pod], s3_server: S3Server, r2_proxy_http: R2Proxy, bucket: str
) -> None:
    """SIDECAR_DELETE_AFTER_S=0 in the image: ComfyUI (root) writes into the top folder, video/ and a fresh
    date folder; the sidecar (its own user) deletes every local copy once it is verified in the bucket,
    none is kept for a permission problem, and the bucket holds every file byte for byte."""
    pod = make_pod(SIDECAR_DELETE_AFTER_S="0", SIDECAR_QUIET_S="1").start()
    pod.wait_ready()
    files = pod.wait_prompt(pod.prompt(comfy_outputs(videos=2, pngs=6)))
    files += pod.wait_prompt(pod.prompt(comfy_outputs(videos=1, pngs=3), date_folder=True))
    assert len(files) == 12
    wait_until(lambda: len(s3_server.keys(bucket)) >= 12, timeout=90, interval=0.2, message=pod.logs)
    outputs = pod.workspace / "outputs"
    wait_until(lambda: not [p for p in outputs.rglob("*") if p.is_file() and not p.name.startswith(".")],
               timeout=60, interval=0.2, message=pod.logs)
    objects = s3_server.objects(bucket)
    assert sorted(k for k in objects if not k.startswith(MANIFESTS)) == sorted(f"pod/{rel}" for rel in files)
    # Each prompt's manifest still lists its files as stored: deleting a local copy changes nothing there.
    wait_until(lambda: len([k for k in s3_server.keys(bucket) if k.startswith(MANIFESTS)]) == 2, timeout=30)
    for key, body in s3_server.objects(bucket).items():
        if key.startswith(MANIFESTS):
            assert {f["status"] for f in json.loads(body)["files"]} == {"stored"}
    deleted = [line for line in pod.log_lines() if line.get("event") == "retention_deleted"]
    assert sorted(line["path"] for line in deleted) == sorted(files)
    assert all(len(objects[f"pod/{line['path']}"]) == line["bytes"] for line in deleted)
    _, metrics = pod.get("/metrics")
    assert b'sidecar_retention_kept_total{reason="permission"} 0.0' in metrics
    status = pod.status()
    assert status["counts"]["deleted"]["files"] == 12 and status["counts"]["uploaded"]["files"] == 0
    modes = pod.exec("sh", "-c", "stat -c '%U %G %a' /workspace/outputs/video").stdout.split()
    report("retention", files=len(files), deleted=len(deleted), video_folder=" ".join(modes))
    assert modes[1] == "sidecar" and modes[2].startswith("27")
