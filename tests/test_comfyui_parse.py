"""sidecar.comfyui against real ComfyUI 0.8 answers (tests/data/comfyui), and the stand-in against the same
shapes, so that the end-to-end job tests run against what ComfyUI really sends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.comfyui_api import ComfyApi

from sidecar.comfyui import ComfyClient, ComfyUnavailable, parse_job

DATA = Path(__file__).parent / "data" / "comfyui"
RUNS = sorted(p for p in DATA.glob("*.json") if not p.name.startswith(("jobs_", "after_")))


def body(name: str) -> Any:
    return json.loads((DATA / name).read_text())["body"]


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_every_recorded_job_gives_its_files(path: Path) -> None:
    raw = json.loads(path.read_text())["body"]
    report = parse_job(raw)
    listed = [f"{i['subfolder']}/{i['filename']}".lstrip("/") for ui in raw.get("outputs", {}).values()
              for items in ui.values() if isinstance(items, list) for i in items if isinstance(i, dict)]
    assert [o.relpath for o in report.outputs] == listed
    assert len(report.outputs) == raw["outputs_count"]
    assert report.finished and report.status == raw["status"]
    assert report.end_time == raw["execution_end_time"] / 1000


def test_the_recorded_special_cases() -> None:
    cached = parse_job(body("a2_resubmitted_identical_cached.json"))
    assert cached.cached_nodes == {"1", "2"}
    assert cached.outputs[0].relpath == "batch/2026-12-01/img_00001_.png"
    partial = parse_job(body("x2_partial_failure.json"))
    assert partial.status == "failed" and [o.relpath for o in partial.outputs] == ["mixed/ok_00001_.png",
                                                                                  "mixed/ok_00002_.png"]
    assert partial.error.startswith("SaveImage (node 3): ERROR: Saving image outside the output folder")
    nothing = parse_job(body("x_error_outside_output.json"))
    assert nothing.status == "failed" and nothing.outputs == ()
    interrupted = parse_job(body("interrupt_with_client_id.json"))
    assert interrupted.status == "failed" and interrupted.error and len(interrupted.outputs) == 1
    latent = parse_job(body("d_latent.json"))
    assert [o.relpath.rsplit(".", 1)[1] for o in latent.outputs] == ["latent"]
    running = parse_job(body("jobs_id_running.json"))
    assert (running.status, running.outputs, running.finished) == ("in_progress", (), False)


def test_a_path_outside_the_output_folder_is_never_taken() -> None:
    raw = {"id": "p", "status": "completed", "outputs": {"9": {"images": [
        {"filename": "x.png", "subfolder": "../escape", "type": "output"},
        {"filename": "y.png", "subfolder": "", "type": "temp"},
        {"filename": "z.png", "subfolder": "ok", "type": "output"}]}}}
    assert [o.relpath for o in parse_job(raw).outputs] == ["ok/z.png"]


@pytest.mark.parametrize("junk", [None, [], {"id": 3}, {"status": "completed"}, "html"])
def test_a_job_of_another_shape_is_refused(junk: Any) -> None:
    with pytest.raises(ComfyUnavailable):
        parse_job(junk)


def test_the_stand_in_answers_in_the_recorded_shapes(tmp_path: Path) -> None:
    recorded_item = body("jobs_list_default.json")["jobs"]
    recorded_ok = next(j for j in recorded_item if j["status"] == "completed")
    recorded_full = body("a2_emptyimage_saveimage_backend_date.json")
    with ComfyApi(tmp_path) as api:
        pid = api.submit({"2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "batch/img", "count": 2}}})
        api.wait_done(pid)
        client = ComfyClient(api.url)
        item = json.loads(_get(api.url + "/api/jobs"))["jobs"][0]
        full = json.loads(_get(api.url + f"/api/jobs/{pid}"))
        assert set(item) == set(recorded_ok) - {"preview_output"}
        assert set(full) == set(recorded_full) - {"preview_output"}
        assert set(json.loads(_get(api.url + "/api/jobs"))["pagination"]) == {"offset", "limit", "total", "has_more"}
        assert [o.relpath for o in client.job(pid).outputs] == ["batch/img_00001_.png", "batch/img_00002_.png"]
        assert client.job("no-such-id") is None  # 404 {"error": "Job not found"}, as recorded
        api.restart()
        assert client.recent() == [] and client.job(pid) is None
        for mode in ("garbage", "error"):
            api.mode = mode
            with pytest.raises(ComfyUnavailable):
                client.recent()
    with pytest.raises(ComfyUnavailable, match="GET /api/jobs"):
        ComfyClient(api.url, timeout_s=1).recent()


def test_a_slow_comfyui_costs_one_timeout(tmp_path: Path) -> None:
    with ComfyApi(tmp_path) as api:
        api.mode, api.slow_s = "slow", 3
        with pytest.raises(ComfyUnavailable, match=r"timed out|TimeoutError"):
            ComfyClient(api.url, timeout_s=0.5).recent()


def _get(url: str) -> str:
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())
