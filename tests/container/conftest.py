"""Fixtures of the image suite: the image built by .ci/run, a private dockerd, a workspace per pod.

Without ``SIDECAR_TEST_IMAGE`` the suite is skipped, except under CI (``CI=true``), where a missing image
is a failure: the image must be tested on every change.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.container import Docker, Pod
from support.proxy import R2Proxy
from support.unprivileged import shared_folder

pytestmark = pytest.mark.container


@pytest.fixture(scope="session")
def docker() -> Docker:
    image = os.environ.get("SIDECAR_TEST_IMAGE", "")
    if not image:
        message = "no SIDECAR_TEST_IMAGE: run bash .ci/run (it builds the image on a private dockerd)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    binary = os.environ.get("SIDECAR_TEST_DOCKER") or shutil.which("docker") or "docker"
    return Docker(binary, image)


@pytest.fixture
def make_pod(docker: Docker, r2_proxy_http: R2Proxy, bucket: str) -> Iterator[Callable[..., Pod]]:
    """``make_pod(**env)``: an unstarted pod pointed at this test's bucket through the recording proxy."""
    pods: list[Pod] = []
    folders: list[Path] = []

    def make(*, workspace: Path | None = None, user: str | None = None, image: str | None = None,
             volumes: tuple[str, ...] = (), **env: str) -> Pod:
        if workspace is None:
            workspace = shared_folder("sidecar-pod-")
            folders.append(workspace)
        settings = {
            "SIDECAR_BUCKET": bucket,
            "SIDECAR_ENDPOINT_URL": r2_proxy_http.endpoint,
            "SIDECAR_REGION": "us-east-1",
            "SIDECAR_ACCESS_KEY_ID": "AKIDPODTESTKEY0001",
            "SIDECAR_SECRET_ACCESS_KEY": "pod-secret-marker-3f1e9a",
            "SIDECAR_POD_ID": "pod",
            "SIDECAR_SETTLE_S": "0.05",
            **env,
        }
        if r2_proxy_http.rules.signing_secret is not None:  # the proxy checks SigV4 with the pod's secret
            r2_proxy_http.rules.signing_secret = settings["SIDECAR_SECRET_ACCESS_KEY"]
        pod = Pod(docker, workspace, settings, user=user, image=image, volumes=volumes)
        pods.append(pod)
        return pod

    yield make
    for pod in pods:
        pod.remove()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def template_image(docker: Docker) -> str:
    """The stand-in of an existing RunPod template (tests/container/template), built by .ci/run."""
    image = os.environ.get("SIDECAR_TEST_TEMPLATE_IMAGE", "")
    if not image:
        message = "no SIDECAR_TEST_TEMPLATE_IMAGE: run bash .ci/run"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return image
