"""Jobs end to end: a real daemon subprocess, the ComfyUI stand-in writing into the watched folder, the strict
R2 proxy in front of moto. Every assertion reads the bucket (or the proxy's record), not the daemon's word."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from support.comfyui_api import ComfyApi
from support.daemon import DaemonProcess
from support.e2e import POD_ID, World
from support.waiting import wait_until

IMAGES = {"class_type": "SaveImage", "inputs": {"filename_prefix": "batch/img", "count": 3, "bytes": 70_000}}
LATENT = {"class_type": "SaveLatent", "inputs": {"filename_prefix": "latents/l", "bytes": 5000}}
VIDEO = {"class_type": "SaveVideo", "inputs": {"filename_prefix": "video/v", "bytes": 400_000, "chunk_pause_s": 0.03}}
FAIL = {"class_type": "Fail", "inputs": {}}
GHOST = {"class_type": "Ghost", "inputs": {"filename_prefix": "ghost/g", "count": 1}}


@pytest.fixture
def comfy(world: World) -> Iterator[ComfyApi]:
    with ComfyApi(world.out) as api:
        yield api


def get(world: World, proc: DaemonProcess, path: str, timeout: float = 40) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(world._url(proc, path), timeout=timeout) as answer:
            return int(answer.status), json.load(answer)
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.load(exc)


def manifest(world: World, prompt_id: str) -> dict[str, Any]:
    return json.loads(world.objects()[f"{POD_ID}/_jobs/{prompt_id}.json"])


def start(world: World, comfy: ComfyApi, **env: str | float) -> DaemonProcess:
    return world.start(comfyui_url=comfy.url, comfyui_poll_s=0.1, **env)


def test_each_prompt_gets_a_manifest_of_exactly_its_files_written_after_them(world: World, comfy: ComfyApi) -> None:
    proc = start(world, comfy)
    graphs = {"images": {"1": IMAGES, "2": LATENT}, "video": {"5": VIDEO, "3": dict(IMAGES)},
              "partial": {"2": {**IMAGES, "inputs": {**IMAGES["inputs"], "filename_prefix": "mixed/ok"}}, "3": FAIL},
              "ghost": {"7": GHOST, "8": LATENT}}
    ids = {name: comfy.submit(graph, client_id="clientX") for name, graph in graphs.items()}
    ids["cached"] = comfy.submit(graphs["images"])  # identical graph: answered from the cache, lists old files
    docs = {}
    for name, pid in ids.items():
        code, doc = get(world, proc, f"/jobs/{pid}?wait=40")
        assert code == 200, doc
        docs[name] = doc
        objects = world.objects()  # read right after the answer: everything it promises is already stored
        if doc["state"] in ("complete", "failed"):
            assert f"{POD_ID}/_jobs/{pid}.json" in objects
            for f in doc["files"]:
                if f["status"] == "stored":
                    assert hashlib.md5(objects[f["key"]]).hexdigest() == f["md5"]
    assert {n: d["state"] for n, d in docs.items()} == {"images": "complete", "video": "complete",
                                                        "partial": "failed", "ghost": "failed", "cached": "complete"}
    objects = world.objects()
    for name, pid in ids.items():
        job = comfy.wait_done(pid)
        listed = [f"{i['subfolder']}/{i['filename']}" for ui in job["outputs"].values() for v in ui.values() for i in v]
        doc = manifest(world, pid)
        assert [f["path"] for f in doc["files"]] == listed, name
        assert doc["prompt_id"] == pid and doc["state"] == docs[name]["state"]
        for f in doc["files"]:
            if name == "ghost" and f["path"].startswith("ghost/"):
                assert (f["status"], f["key"]) == ("missing", None)
                continue
            assert f["status"] == "stored" and f["key"] == world.key(f["path"])
            assert objects[f["key"]] == (world.out / f["path"]).read_bytes()
            assert f["md5"] == hashlib.md5(objects[f["key"]]).hexdigest()
    assert [f["path"] for f in manifest(world, ids["cached"])["files"]] == \
        [f["path"] for f in manifest(world, ids["images"])["files"]]
    assert manifest(world, ids["partial"])["comfyui_status"] == "failed"
    assert len(manifest(world, ids["partial"])["files"]) == 3  # what it wrote before the failing node
    # Written last, and once: each manifest's one PUT follows the PUTs of its files.
    puts = world.puts_by_key()
    for name, pid in ids.items():
        key = f"{POD_ID}/_jobs/{pid}.json"
        assert len(puts[key]) == 1, name
        files = [f["key"] for f in manifest(world, pid)["files"] if f["key"]]
        assert all(puts[k][0].timestamp <= puts[key][0].timestamp for k in files), name
    # One PUT per file, nothing else re-sent; the job counters moved by exactly what happened.
    assert all(len(reqs) == 1 for reqs in puts.values())
    metrics = world.metrics(proc)
    assert 'sidecar_jobs_done_total{state="complete"} 3.0' in metrics
    assert 'sidecar_jobs_done_total{state="failed"} 2.0' in metrics
    assert 'sidecar_manifests_total{outcome="written"} 5.0' in metrics
    listing = get(world, proc, "/jobs?limit=2")[1]
    assert listing["pagination"]["total"] == 5 and len(listing["jobs"]) == 2
    assert len(proc.events("job_done")) == 5


@pytest.mark.parametrize("websocket", [True, False], ids=["websocket", "polling"])
def test_an_idle_pod_asks_comfyui_nothing(world: World, comfy: ComfyApi, websocket: bool) -> None:
    comfy.websocket = websocket
    proc = start(world, comfy)
    # With the socket, or once the daemon gave up on one (its tries are requests too).
    event = "comfyui_websocket_connected" if websocket else "comfyui_websocket_unsupported"
    wait_until(lambda: proc.events(event), timeout=20, message=proc.output)
    assert get(world, proc, "/healthz")[0] == 200  # giving up on the socket ends no thread
    pid = comfy.submit({"1": IMAGES})
    assert get(world, proc, f"/jobs/{pid}?wait=30")[1]["state"] == "complete"
    wait_until(lambda: get(world, proc, "/status")[1]["jobs"]["polling"] is False, timeout=30)
    before = len(comfy.requests)
    code, idle = get(world, proc, "/idle?wait=5")
    assert (code, idle["idle"]) == (200, True)
    # Nothing runs, nothing is written: no request in a window of 20 poll intervals (absence needs a window).
    time.sleep(2.0)
    assert len(comfy.requests) == before
    gets = [r for r in comfy.requests if r.startswith("GET ") and not r.startswith("GET /ws")]
    assert all(r.startswith("GET /api/jobs") for r in gets)
    # One GET of the prompt's file list, and at most one more: the waiter asked before any poll had seen it.
    assert 1 <= len([r for r in gets if r.startswith(f"GET /api/jobs/{pid}")]) <= 2
    polls = len([r for r in gets if r.startswith("GET /api/jobs?")])
    if websocket:  # one at start, one at connect, then one per status broadcast (queued, started, ended)
        assert polls <= 2 + comfy.status_sent
    else:  # every 0.1 s while it ran, and a few after its files were recorded
        assert polls >= 3


def test_a_prompt_id_template_holds_files_until_comfyui_names_the_prompt(world: World, comfy: ComfyApi) -> None:
    proc = start(world, comfy, key_template="{prompt_id}/{relpath}", prompt_wait_s=1.5)
    pid = comfy.submit({"1": IMAGES})
    code, doc = get(world, proc, f"/jobs/{pid}?wait=30")
    assert (code, doc["state"]) == (200, "complete")
    keys = [f["key"] for f in doc["files"]]
    assert keys == [f"{pid}/batch/img_{n:05d}_.png" for n in (1, 2, 3)]
    for key in keys:
        head = world.s3.head(world.bucket, key)
        assert head is not None and head["Metadata"]["prompt-id"] == pid
    # A file no prompt claims goes to the fallback segment once the wait is over.
    world.path("dropped.png").write_bytes(b"by hand")
    wait_until(lambda: "no-prompt/dropped.png" in world.bucket_keys(), timeout=20, message=proc.output)
    assert world.objects()["no-prompt/dropped.png"] == b"by hand"
    assert 'sidecar_files_held_for_prompt_total' in world.metrics(proc)


@pytest.mark.parametrize("trouble", ["down", "garbage", "error"])
def test_comfyui_absent_or_broken_never_touches_uploads(world: World, comfy: ComfyApi, trouble: str) -> None:
    if trouble == "down":
        comfy.stop()
    else:
        comfy.mode = trouble
    proc = start(world, comfy)
    rels = [world.remember(f"day/ComfyUI_{n:05d}_.png", bytes([n]) * 3000) for n in range(1, 6)]
    for rel in rels:
        world.path(rel).parent.mkdir(exist_ok=True)
        world.path(rel).write_bytes(world.written[rel])
    world.wait_in_bucket(rels, proc)
    assert world.bucket_diff(world.expected()) == []
    code, doc = get(world, proc, "/jobs/0b5e0d40-0000-4000-8000-000000000000")
    assert (code, doc["state"], doc["comfyui_up"]) == (404, "unknown", False)
    lines = proc.events("comfyui_unavailable")
    assert len(lines) == 1 and lines[0]["url"] == comfy.url and "GET /api/jobs" in lines[0]["error"]
    assert get(world, proc, "/idle")[1]["idle"] is True
    assert "sidecar_comfyui_up 0.0" in world.metrics(proc)
    assert get(world, proc, "/healthz")[0] == 200


def test_a_comfyui_restart_mid_prompt_ends_the_job_failed_with_what_it_wrote(world: World, comfy: ComfyApi) -> None:
    proc = start(world, comfy)
    pid = comfy.submit({"5": VIDEO})
    wait_until(lambda: get(world, proc, f"/jobs/{pid}")[0] == 200, timeout=20)
    comfy.restart()  # history and jobs are gone; the video is still being written
    code, doc = get(world, proc, f"/jobs/{pid}?wait=30")
    assert (code, doc["state"], doc["comfyui_status"]) == (200, "failed", "lost")
    assert "restarted" in doc["error"]
    assert proc.events("job_lost")
    rel = next(iter(comfy.closed_at), None)
    wait_until(lambda: rel or next(iter(comfy.closed_at), None), timeout=20)
    rel = next(iter(comfy.closed_at))
    world.wait_in_bucket([rel], proc)  # the file itself is still uploaded
    assert world.objects()[world.key(rel)] == world.path(rel).read_bytes()


def test_a_kill_9_mid_prompt_loses_nothing_and_writes_one_manifest(world: World, comfy: ComfyApi) -> None:
    proc = start(world, comfy)
    first = comfy.submit({"1": IMAGES})
    assert get(world, proc, f"/jobs/{first}?wait=30")[1]["state"] == "complete"
    pid = comfy.submit({"5": {**VIDEO, "inputs": {**VIDEO["inputs"], "chunk_pause_s": 0.05}}, "6": LATENT})
    wait_until(lambda: comfy.closed_at and get(world, proc, f"/jobs/{pid}")[0] == 200, timeout=20)
    proc.kill()  # the prompt finishes while no daemon runs
    comfy.wait_done(pid)
    restarted_at = len(comfy.requests)
    proc = start(world, comfy)
    code, doc = get(world, proc, f"/jobs/{pid}?wait=40")
    assert (code, doc["state"]) == (200, "complete")
    assert all(world.objects()[f["key"]] == (world.out / f["path"]).read_bytes() for f in doc["files"])
    puts = world.puts_by_key()
    assert len(puts[f"{POD_ID}/_jobs/{pid}.json"]) == 1 and len(puts[f"{POD_ID}/_jobs/{first}.json"]) == 1
    # The restarted daemon re-read ComfyUI's recent jobs but fetched no file list it already had.
    assert f"GET /api/jobs/{first}" not in comfy.requests[restarted_at:]


def test_presigned_urls_fetch_the_stored_bytes_and_never_reach_the_log(world: World, comfy: ComfyApi) -> None:
    proc = start(world, comfy, presign_ttl_s=600)
    pid = comfy.submit({"1": IMAGES})
    code, doc = get(world, proc, f"/jobs/{pid}?wait=30")
    assert (code, doc["state"]) == (200, "complete")
    context = ssl.create_default_context(cafile=str(world.proxy.ca_bundle))
    for f in doc["files"]:
        assert "X-Amz-Expires=600" in f["url"] and "X-Amz-Signature=" in f["url"]
        with urllib.request.urlopen(f["url"], timeout=10, context=context) as answer:
            assert answer.read() == (world.out / f["path"]).read_bytes()
    signatures = [f["url"].split("X-Amz-Signature=")[1][:64] for f in doc["files"]]
    assert not any(sig in world.all_output() for sig in signatures)
