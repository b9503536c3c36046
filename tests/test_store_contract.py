"""The ObjectStore contract, run against the in-memory store and against the real S3 server behind the
R2-strict proxy (through boto3 alone, and with single PUTs on the direct path): what the transfer relies on
must hold for each, or the fast tests prove nothing."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.memstore import MemoryStore
from support.proxy import R2Proxy
from support.s3server import S3Server

from sidecar.config import load_settings
from sidecar.direct_put import direct_put_for
from sidecar.errors import KeyExistsError, PermanentStoreError
from sidecar.journal import FileRow
from sidecar.keys import KeyBuilder
from sidecar.routing import Router
from sidecar.store import ObjectHeaders, ObjectStore, composite_etag
from sidecar.store_s3 import S3Store, make_client
from sidecar.transfer import MIB, Transfer

Objects = Callable[[], dict[str, bytes]]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(params=["memory", "s3", "s3-direct"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ObjectStore, Objects]]:
    """(store, a function that lists what the bucket holds) for each implementation."""
    if request.param == "memory":
        mem = MemoryStore()
        yield mem, lambda: dict(mem.objects)
        return
    proxy: R2Proxy = request.getfixturevalue("r2_proxy")
    bucket: str = request.getfixturevalue("bucket")
    s3_server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(proxy.ca_bundle))
    settings = load_settings(bucket=bucket, endpoint_url=proxy.endpoint, region="us-east-1",
                             access_key_id="testing", secret_access_key="testing")
    direct = None
    if request.param == "s3-direct":  # single PUTs on http.client (sidecar.direct_put), the rest on boto3
        direct, reason = direct_put_for(settings)
        assert direct is not None, reason
    yield S3Store(make_client(settings), bucket, direct=direct), lambda: s3_server.objects(bucket)


class Ledger:
    def set_upload(self, row_id: int, key: str | None, upload_id: str | None) -> None:
        pass

    def add_orphan(self, key: str, upload_id: str) -> None:
        pass


def row(path: bytes, **kw: object) -> FileRow:
    fields: dict[str, object] = dict(id=1, path=path, size=0, mtime_ns=0, state="uploading", source="close",
                                     attempts=0, discovered_at=0.0, md5=None, key=None, etag=None, upload_id=None)
    fields.update(kw)
    return FileRow(**fields)  # type: ignore[arg-type]


def test_put_returns_the_md5_and_refuses_a_taken_key(store: tuple[ObjectStore, Objects]) -> None:
    s, objects = store
    assert s.put("k", b"one", md5_hex=md5(b"one"), headers=ObjectHeaders("image/png")) == md5(b"one")
    with pytest.raises(KeyExistsError):
        s.put("k", b"two", md5_hex=md5(b"two"), headers=ObjectHeaders("image/png"))
    assert objects() == {"k": b"one"}


def test_head_tells_size_and_md5_or_none(store: tuple[ObjectStore, Objects]) -> None:
    s, _ = store
    s.put("k", b"one", md5_hex=md5(b"one"), headers=ObjectHeaders("image/png"))
    info = s.head("k")
    assert info is not None and (info.size, info.md5, info.etag) == (3, md5(b"one"), md5(b"one"))
    assert s.head("nope") is None


def test_multipart_completes_with_the_composite_etag_and_never_overwrites(store: tuple[ObjectStore, Objects]) -> None:
    s, objects = store
    parts = [b"a" * (5 * MIB), b"b" * 100]
    upload = s.create_multipart("big", md5_hex=md5(b"".join(parts)), headers=ObjectHeaders("video/mp4"))
    etags = [s.upload_part("big", upload, n, p) for n, p in enumerate(parts, start=1)]
    assert etags == [md5(p) for p in parts]
    assert s.complete_multipart("big", upload, etags) == composite_etag(etags)
    other = s.create_multipart("big", md5_hex=md5(b"x"), headers=ObjectHeaders("video/mp4"))
    other_etags = [s.upload_part("big", other, 1, b"x" * 10)]
    with pytest.raises(KeyExistsError):
        s.complete_multipart("big", other, other_etags)
    s.abort_multipart("big", other)
    s.abort_multipart("big", other)  # aborting twice is fine
    assert objects() == {"big": b"".join(parts)}
    info = s.head("big")
    assert info is not None and info.etag == composite_etag(etags) and info.md5 == md5(b"".join(parts))


def test_completing_an_unknown_upload_is_no_such_upload(store: tuple[ObjectStore, Objects],
                                                        request: pytest.FixtureRequest) -> None:
    """S3 and R2 answer 404 NoSuchUpload (what a retried completion whose answer was lost meets)."""
    if request.node.callspec.params["store"] != "memory":
        pytest.skip("moto 5.2.5 answers 500 InternalError here; S3 and R2 answer 404 NoSuchUpload")
    s, _ = store
    upload = s.create_multipart("k", md5_hex=md5(b"x"), headers=ObjectHeaders("image/png"))
    etags = [s.upload_part("k", upload, 1, b"x")]
    s.abort_multipart("k", upload)
    with pytest.raises(PermanentStoreError) as err:
        s.complete_multipart("k", upload, etags)
    assert err.value.code == "NoSuchUpload"


@pytest.mark.parametrize("size", [1000, 11 * MIB], ids=["single", "multipart"])
def test_transfer_round_trips_and_recognises_its_own_object(store: tuple[ObjectStore, Objects], tmp_path: Path,
                                                            size: int) -> None:
    """The transfer on top of either store: bytes identical; a second run after a lost journal is 'existing';
    new bytes under the same name go to the variant."""
    s, objects = store
    data = os.urandom(size)
    (tmp_path / "a.bin").write_bytes(data)
    transfer = Transfer(s, tmp_path, Router.plain(KeyBuilder("p/{relpath}", "p")), multipart_threshold=5 * MIB,
                        part_size=5 * MIB, retry=lambda fn: fn(), ledger=Ledger())
    first = transfer.run(row(b"a.bin"))
    assert (first.outcome, objects()) == ("uploaded", {"p/a.bin": data})
    assert transfer.run(row(b"a.bin")).outcome == "existing"
    newer = os.urandom(size)
    (tmp_path / "a.bin").write_bytes(newer)
    second = transfer.run(row(b"a.bin"))
    assert second.variant_of == "p/a.bin" and objects() == {"p/a.bin": data, second.key: newer}


def test_the_test_servers_etag_is_right_under_concurrent_reads(s3_server: S3Server, bucket: str) -> None:
    """The suite's moto computes each ETag under the key's lock (tests/support/moto_server.py): HEADs racing
    GETs of fresh keys always report the MD5 of the bytes, so the sidecar's trust in the store's ETag is
    tested against a store that keeps its word."""
    client = s3_server.direct
    data = os.urandom(2 * MIB)
    wrong: list[str] = []
    for n in range(12):
        key = f"race-{n}"
        client.put_object(Bucket=bucket, Key=key, Body=data)

        def get(k: str = key) -> None:
            client.get_object(Bucket=bucket, Key=k)["Body"].read()

        def head(k: str = key) -> None:
            etag = client.head_object(Bucket=bucket, Key=k)["ETag"].strip('"')
            if etag != md5(data):
                wrong.append(etag)

        threads = [threading.Thread(target=fn) for fn in (get, head, get, head, get, head)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == []
