"""The ceiling: raw boto3 uploads of files already on disk, from one process, no watching or journal.

Protocol with the benchmark: prints ``ready`` once the client exists and the files are listed, waits for a
line on stdin, uploads, then prints one JSON line ``{"start": t, "end": t, "times": {key: seconds}}``.
That keeps interpreter start-up and imports out of the measurement, as they are for a running daemon.

Modes: ``put`` (put_object, botocore defaults incl. its CRC32 checksum), ``put-md5`` (the R2-safe form:
checksums only when required plus an explicit Content-MD5), ``upload-file`` (managed multipart transfer),
``sidecar-store`` (the daemon's own request path: its client configuration and ``S3Store.put`` with
Content-MD5, If-None-Match and the ETag proof, on a bare thread pool: no watching, journal or checks —
the real ceiling for the daemon's request form; needs the repository on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

HEADERS: Any = None  # the daemon's ObjectHeaders (sidecar-store mode)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--mode", choices=["put", "put-md5", "upload-file", "sidecar-store"], default="put")
    a = p.parse_args()
    extra = {}
    if a.mode == "put-md5":
        extra = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    config = Config(s3={"addressing_style": "path"}, max_pool_connections=max(10, a.threads), **extra)
    client = boto3.client("s3", endpoint_url=a.endpoint, config=config)
    files = sorted(
        os.path.relpath(os.path.join(d, f), a.dir) for d, _, names in os.walk(a.dir) for f in names
    )
    transfer = TransferConfig(max_concurrency=a.threads)
    store = sidecar_store(a) if a.mode == "sidecar-store" else None

    def upload(key: str) -> tuple[str, float]:
        t = time.time()
        path = os.path.join(a.dir, key)
        if store is not None:
            with open(path, "rb") as f:
                body = f.read()
            store.put(key, body, md5_hex=hashlib.md5(body).hexdigest(), headers=HEADERS)
        elif a.mode == "upload-file":
            client.upload_file(path, a.bucket, key, Config=transfer)
        else:
            with open(path, "rb") as f:
                body = f.read()
            md5 = {"ContentMD5": base64.b64encode(hashlib.md5(body).digest()).decode()} if a.mode == "put-md5" else {}
            client.put_object(Bucket=a.bucket, Key=key, Body=body, **md5)
        return key, time.time() - t

    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    with ThreadPoolExecutor(a.threads) as pool:
        times = dict(pool.map(upload, files))
    print(json.dumps({"start": start, "end": time.time(), "times": times}), flush=True)


def sidecar_store(a: argparse.Namespace) -> Any:
    """The daemon's S3Store, built by its own make_client and direct_put_for from its own Settings (as the
    daemon does: single PUTs on the direct path)."""
    global HEADERS  # noqa: PLW0603 - set once, before the pool starts
    from sidecar.config import load_settings  # noqa: PLC0415 - only this mode needs the repository
    from sidecar.direct_put import direct_put_for  # noqa: PLC0415
    from sidecar.store import ObjectHeaders  # noqa: PLC0415
    from sidecar.store_s3 import S3Store, make_client  # noqa: PLC0415

    HEADERS = ObjectHeaders("image/png")
    settings = load_settings(bucket=a.bucket, endpoint_url=a.endpoint, region="us-east-1", workers=a.threads,
                             access_key_id="bench", secret_access_key="bench")
    direct, _ = direct_put_for(settings)
    return S3Store(make_client(settings), a.bucket, direct=direct)


if __name__ == "__main__":
    main()
