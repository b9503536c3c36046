"""examples/runpod_serverless_handler.py against the ComfyUI stand-in and a real sidecar daemon."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from support.comfyui_api import ComfyApi
from support.e2e import World

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "runpod_serverless_handler.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_handler", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_handler_returns_the_stored_keys_of_every_output(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    with ComfyApi(world.out) as comfy:
        proc = world.start(comfyui_url=comfy.url, comfyui_poll_s=0.1, public_base_url="https://cdn.example.com")
        monkeypatch.setenv("COMFYUI_URL", comfy.url)
        monkeypatch.setenv("SIDECAR_URL", world._url(proc, ""))
        handler = load().handler
        graph = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hero", "count": 2}},
                 "4": {"class_type": "SaveVideo", "inputs": {"filename_prefix": "clip", "bytes": 200_000}}}
        result = handler({"input": {"workflow": graph}})
        objects = world.objects()
        assert result["state"] == "complete" and "error" not in result
        assert [f["path"] for f in result["files"]] == ["hero_00001_.png", "hero_00002_.png", "clip_00001_.mp4"]
        for f in result["files"]:
            assert objects[f["key"]] == (world.out / f["path"]).read_bytes()
            assert f["url"] == f"https://cdn.example.com/{f['key']}"
        assert result["manifest_key"] in objects
        failed = handler({"input": {"workflow": {"1": graph["9"], "2": {"class_type": "Fail", "inputs": {}}}}})
        assert failed["state"] == "failed" and failed["error"].startswith("Fail (node 2)")
        assert handler({"input": {}}) == {"error": "input.workflow must be a ComfyUI API-format graph"}
