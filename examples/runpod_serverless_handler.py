"""A RunPod-serverless-style handler: submit a ComfyUI workflow, return only once its outputs are in the bucket.

The drop-in for a worker that uploads images itself (and only images): the sidecar running beside ComfyUI
uploads every output (video, audio, latents too), and this handler returns the keys and URLs from the job the
sidecar reports, after ``GET /jobs/{prompt_id}?wait`` says ``complete`` -- never before the last object and
the manifest are stored. Standard library only; with the ``runpod`` package installed it starts the worker.

Input: ``{"input": {"workflow": <ComfyUI API-format graph>}}``. Output: ``{"prompt_id", "state", "files":
[{"path", "key", "url", "bytes", "md5", "content_type", "node_id"}], "manifest_key"}``, or ``{"error": ...}``.

Environment: ``COMFYUI_URL`` (default http://127.0.0.1:8188), ``SIDECAR_URL`` (default
http://127.0.0.1:9188), ``SIDECAR_HTTP_TOKEN`` if the sidecar has one, ``JOB_TIMEOUT_S`` (default 900).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

WAIT_CHUNK_S = 120  # one long poll; the sidecar caps a wait at 300 s


def _call(url: str, body: dict[str, Any] | None = None, *, token: str = "", timeout: float = 30) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})  # noqa: S310
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - configured local URLs
            return int(answer.status), json.load(answer)
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.load(exc)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    comfyui = os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188").rstrip("/")
    sidecar = os.environ.get("SIDECAR_URL", "http://127.0.0.1:9188").rstrip("/")
    token = os.environ.get("SIDECAR_HTTP_TOKEN", "")
    deadline = time.monotonic() + float(os.environ.get("JOB_TIMEOUT_S", "900"))
    workflow = (job.get("input") or {}).get("workflow")
    if not isinstance(workflow, dict):
        return {"error": "input.workflow must be a ComfyUI API-format graph"}
    status, answer = _call(f"{comfyui}/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})
    if status != 200:
        return {"error": "ComfyUI refused the workflow", "details": answer}
    prompt_id = answer["prompt_id"]
    doc: dict[str, Any] = {}
    while (left := deadline - time.monotonic()) > 0:
        wait = min(WAIT_CHUNK_S, left)
        status, doc = _call(f"{sidecar}/jobs/{prompt_id}?wait={wait:.0f}", token=token, timeout=wait + 15)
        if status == 429:  # every long-poll slot of the sidecar is taken
            time.sleep(1)
            continue
        if status == 200 and doc["state"] in ("complete", "failed"):
            break
    else:
        return {"error": "timed out before the outputs were stored", "prompt_id": prompt_id,
                "state": doc.get("state", "unknown")}
    files = [{k: f[k] for k in ("path", "key", "url", "bytes", "md5", "content_type", "node_id")}
             for f in doc["files"] if f["status"] == "stored"]
    result = {"prompt_id": prompt_id, "state": doc["state"], "files": files, "manifest_key": doc["manifest_key"]}
    if doc["state"] != "complete":
        result["error"] = doc.get("error") or "some outputs were not stored"
        result["not_stored"] = [{"path": f["path"], "status": f["status"], "error": f["error"]}
                                for f in doc["files"] if f["status"] != "stored"]
    return result


if __name__ == "__main__":
    import runpod  # type: ignore[import-not-found]  # the RunPod worker SDK, installed in the worker image

    runpod.serverless.start({"handler": handler})
