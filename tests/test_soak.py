"""Soak: the long versions of the fault suite, run on demand with ``pytest -m soak`` (deselected by default).

Sizes come from the environment so a longer run needs no edit: ``SIDECAR_SOAK_KILLS`` (25 kills),
``SIDECAR_SOAK_OUTAGE_FILES`` (files written while the store is down: 900 at 5 per second, about three
minutes), ``SIDECAR_SOAK_SPARSE_GIB`` (52 GiB: more than 10,000 parts of 5 MiB, so the part size must grow).
The default suite runs the short versions of the same drivers (see test_faults.py, test_hostile_inputs.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faults import Rig
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.scenarios import kill_loop, outage_under_stream, sparse_upload

SOAK_KILLS = int(os.environ.get("SIDECAR_SOAK_KILLS", "25"))
SOAK_OUTAGE_FILES = int(os.environ.get("SIDECAR_SOAK_OUTAGE_FILES", "900"))
SOAK_SPARSE_GIB = float(os.environ.get("SIDECAR_SOAK_SPARSE_GIB", "52"))

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]


@pytest.fixture
def rig(tmp_path: Path, s3_server: S3Server, r2_proxy: R2Proxy, bucket: str) -> Iterator[Rig]:
    """A watched folder, a state folder and a bucket behind the strict https proxy; daemons stopped after."""
    r = Rig(tmp_path, s3_server, bucket, proxy=r2_proxy)
    yield r
    r.close()


def test_kill_9_soak(rig: Rig) -> None:
    """SIGKILL ≥ 20 times at random moments of a burst: all files arrive intact; re-uploads ≤ uploads in flight."""
    assert SOAK_KILLS >= 20
    kill_loop(rig, SOAK_KILLS, seed=12)


def test_outage_of_minutes_soak(rig: Rig) -> None:
    """The store down for minutes under a steady stream: no file fails or is lost, backoff stays capped, the
    log stays readable, and everything uploads once when it returns."""
    tally = outage_under_stream(rig, outage_files=SOAK_OUTAGE_FILES, min_probes=20, every_s=0.2,
                                retry_cap_s=5.0, scenario=f"S3 outage of minutes ({SOAK_OUTAGE_FILES} files written "
                                "while down)")
    assert tally.extra["log_lines"] < 20 * tally.files_written  # rate-limited, not a line per retry per second


def test_sparse_tens_of_gb_file_soak(tmp_path: Path, s3_server: S3Server) -> None:
    """A sparse file of tens of GB with 5 MiB parts needs > 10,000 parts: the part size grows, memory does not."""
    sparse_upload(tmp_path, s3_server, SOAK_SPARSE_GIB, 5, f"Sparse file of {SOAK_SPARSE_GIB:g} GiB to the sink")
