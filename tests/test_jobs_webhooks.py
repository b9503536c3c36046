"""Webhooks and the waiting commands: signed per the Standard Webhooks spec, delivered at least once from the
journal across a receiver outage and a kill -9; `sidecar wait` / `sidecar flush` exit codes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from support.comfyui_api import ComfyApi
from support.e2e import World
from support.waiting import wait_until

from sidecar.webhooks import sign

SECRET = "whsec_" + base64.b64encode(b"a test secret of 24 bytes").decode()
IMAGES = {"class_type": "SaveImage", "inputs": {"filename_prefix": "hook/img", "count": 2, "bytes": 20_000}}


def test_signature_matches_the_specification_example() -> None:
    # The example of the Standard Webhooks reference libraries (standard-webhooks/standard-webhooks).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


class Receiver:
    """A webhook endpoint on 127.0.0.1 that checks every signature the way a receiver library does."""

    def __init__(self) -> None:
        self.failing = True
        self.got: list[dict[str, Any]] = []
        self.refused = 0
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg_id, stamp = self.headers["webhook-id"], int(self.headers["webhook-timestamp"])
                key = base64.b64decode(SECRET.removeprefix("whsec_"))
                want = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256)
                                        .digest()).decode()
                sigs = [s.split(",", 1)[1] for s in self.headers["webhook-signature"].split(" ")]
                ok = want in sigs and abs(time.time() - stamp) < 300
                if receiver.failing or not ok:
                    receiver.refused += 1
                    receiver.bad_signatures += not ok
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.got.append({"id": msg_id, **json.loads(body)})
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks?tenant=a"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_each_job_is_delivered_at_least_once_across_an_outage_and_a_kill(world: World, receiver: Receiver) -> None:
    with ComfyApi(world.out) as comfy:
        env = {"comfyui_url": comfy.url, "comfyui_poll_s": 0.1, "webhook_url": receiver.url, "webhook_secret": SECRET}
        proc = world.start(**env)
        ids = [comfy.submit({"1": {**IMAGES, "inputs": {**IMAGES["inputs"], "bytes": 20_000 + n}}}) for n in range(3)]
        wait_until(lambda: len(proc.events("job_done")) == 3, timeout=40, message=proc.output)
        wait_until(lambda: receiver.refused >= 3, timeout=20, message=proc.output)  # the receiver is down
        assert 'sidecar_webhook_deliveries_total{outcome="failed"}' in world.metrics(proc)
        proc.kill()  # kill -9 with every event still undelivered
        receiver.failing = False
        proc = world.start(**env)
        wait_until(lambda: {g["data"]["prompt_id"] for g in receiver.got} == set(ids), timeout=40,
                   message=proc.output)
    assert receiver.bad_signatures == 0
    by_prompt = {g["data"]["prompt_id"]: g for g in receiver.got}
    for pid in ids:
        event = by_prompt[pid]
        assert event["type"] == "job.complete" and event["data"]["state"] == "complete"
        assert [f["key"] for f in event["data"]["files"]] == \
            [f["key"] for f in json.loads(world.objects()[f"{event['data']['manifest_key']}"])["files"]]
    assert len({g["id"] for g in receiver.got}) == 3  # one event id per job, the same across retries
    out = world.all_output()
    assert SECRET not in out and "tenant=a" not in out  # neither the secret nor the URL's query is printed


def test_file_events_come_per_stored_file_signed_like_job_events(world: World, receiver: Receiver) -> None:
    receiver.failing = False
    with ComfyApi(world.out) as comfy:
        proc = world.start(comfyui_url=comfy.url, comfyui_poll_s=0.1, webhook_url=receiver.url,
                           webhook_secret=SECRET, webhook_events="job,file")
        pid = comfy.submit({"1": IMAGES})
        wait_until(lambda: any(g["type"] == "job.complete" for g in receiver.got), timeout=30, message=proc.output)
        world.path("by-hand.png").write_bytes(b"dropped in")
        wait_until(lambda: len([g for g in receiver.got if g["type"] == "file.stored"]) == 3, timeout=30,
                   message=proc.output)
    files = {g["data"]["path"]: g["data"] for g in receiver.got if g["type"] == "file.stored"}
    assert set(files) == {"hook/img_00001_.png", "hook/img_00002_.png", "by-hand.png"}
    for path, data in files.items():
        assert world.objects()[data["key"]] == world.path(path).read_bytes()
        assert data["md5"] == hashlib.md5(world.path(path).read_bytes()).hexdigest()
    assert receiver.bad_signatures == 0
    job = next(g for g in receiver.got if g["type"] == "job.complete")
    assert job["data"]["prompt_id"] == pid


def test_wait_and_flush_say_how_it_ended(world: World) -> None:
    with ComfyApi(world.out) as comfy:
        proc = world.start(comfyui_url=comfy.url, comfyui_poll_s=0.1)
        port = str(proc.events("http_started")[0]["port"])
        pid = comfy.submit({"1": IMAGES})
        code, out, _ = world.cli("wait", pid, "--timeout", "30", http_port=port)
        assert code == 0, out
        doc = json.loads(out)
        assert doc["state"] == "complete" and all(f["key"] in world.bucket_keys() for f in doc["files"])
        failing = comfy.submit({"1": {**IMAGES, "inputs": {**IMAGES["inputs"], "filename_prefix": "f/x"}},
                                "2": {"class_type": "Fail", "inputs": {}}})
        assert world.cli("wait", failing, "--timeout", "30", http_port=port)[0] == 1
        assert world.cli("wait", "never-submitted", "--timeout", "1", http_port=port)[0] == 4
        slow = comfy.submit({"5": {"class_type": "SaveVideo", "inputs": {"filename_prefix": "v/v", "bytes": 600_000,
                                                                          "chunk_pause_s": 0.2}}})
        assert world.cli("wait", slow, "--timeout", "1", http_port=port)[0] == 3
        code, out, _ = world.cli("flush", "--timeout", "60", http_port=port)
        assert code == 0 and json.loads(out)["idle"] is True
        proc.stop()
        code, _, err = world.cli("flush", "--timeout", "1", http_port=port)
        assert code == 5 and "no daemon answering" in err
