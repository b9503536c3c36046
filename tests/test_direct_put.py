"""The direct PutObject path (sidecar.direct_put): the request botocore would send, signed so that an
independent SigV4 verifier and botocore agree, answered and classified like botocore's answers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from support import sigv4 as verifier
from support.proxy import R2Proxy
from support.s3server import S3Server

from sidecar.config import Settings, load_settings
from sidecar.direct_put import DirectPut, direct_put_for, part_query
from sidecar.errors import KeyExistsError, PermanentStoreError, TransientStoreError
from sidecar.filebody import FileSlice
from sidecar.sigv4 import SigV4Signer, s3_path
from sidecar.store import ObjectHeaders
from sidecar.store_s3 import S3Store, make_client

HOSTILE_KEYS = [
    "pod/ComfyUI_00001_.png", "pod/a b/c+d=e&f;g,h.png", "pod/%date:yyyy-MM-dd%/x.png", "pod/ünïcödé/日本語.png",
    "pod/~tilde/(1)!*'$@.png", "pod//double/./dot/../x.png", "pod/%2525literal%20.png", "pod/tab\there?q=1#frag",
]
HEADERS = ObjectHeaders("image/png", "public, max-age=60", "attachment", "STANDARD",
                        (("note", "two  spaces inside"), ("prompt-id", "8c6f0c4e")))


def md5(data: bytes | bytearray) -> str:
    return hashlib.md5(data).hexdigest()


def settings_for(endpoint: str, bucket: str = "b", **overrides: Any) -> Settings:
    fields: dict[str, Any] = dict(bucket=bucket, endpoint_url=endpoint, region="us-east-1",
                                  access_key_id="testing", secret_access_key="testing")
    fields.update(overrides)
    return load_settings(**fields)


@pytest.fixture
def direct(r2_proxy: R2Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DirectPut, list[str]]]:
    """(a DirectPut through the strict https proxy, the statuses its observer was told)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(r2_proxy.ca_bundle))
    seen: list[str] = []
    put, reason = direct_put_for(settings_for(r2_proxy.endpoint, bucket, read_timeout_s=1.0),
                                 observer=lambda op, status: seen.append(f"{op} {status}"))
    assert put is not None, reason
    yield put, seen
    put.close()


def test_signatures_verify_independently_for_hostile_keys() -> None:
    """Every key, however hostile, gets a signature the spec-written verifier accepts, and only for its secret."""
    signer = SigV4Signer("testing", "testing", "us-east-1", clock=lambda: 1_700_000_000.0)
    for key in HOSTILE_KEYS:
        path = s3_path("bucket", key)
        sent = signer.sign("PUT", path, [("host", "127.0.0.1:9"), ("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg=="),
                                         *HEADERS.http_headers(md5(b""))])
        headers = {name.lower(): value for name, value in sent}
        assert verifier.verify("PUT", path, headers, b"", "testing") is None, key
        assert verifier.verify("PUT", path, headers, b"", "other") == "signature does not match"


def botocore_request(client: Any, operation: str, call: Callable[[], object]) -> Any:
    """The request botocore signs for ``call`` (an ``operation`` of ``client``), caught before it is sent."""
    captured: list[Any] = []

    class Captured(Exception):
        pass

    def grab(request: Any, **_: Any) -> None:
        captured.append(request)
        raise Captured  # nothing is sent

    client.meta.events.register(f"before-send.s3.{operation}", grab)
    try:
        with pytest.raises(Captured):
            call()
    finally:
        client.meta.events.unregister(f"before-send.s3.{operation}", grab)
    return captured.pop()


def our_authorization(request: Any, *, query: str = "") -> tuple[str, str]:
    """(botocore's Authorization header, ours for the same method, path, signed headers and date)."""
    url = urlsplit(request.url)
    values = {"host": url.netloc, **{k.lower(): v.decode() if isinstance(v, bytes) else str(v)
                                     for k, v in request.headers.items()}}
    names = values["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    ours = SigV4Signer("testing", "testing", "us-east-1").sign(
        request.method, url.path, [(n, values[n]) for n in names if n not in ("x-amz-date", "x-amz-content-sha256")],
        query=query, amz_date=values["x-amz-date"])
    return values["authorization"], dict(ours)["Authorization"]


def test_path_and_signature_equal_botocores_for_the_same_request() -> None:
    """For each hostile key, the path on the wire and the Authorization header are exactly botocore's."""
    client = make_client(settings_for("http://127.0.0.1:9"))
    for key in HOSTILE_KEYS:
        request = botocore_request(client, "PutObject", lambda k=key: client.put_object(
            Bucket="bucket", Key=k, Body=b"x", ContentMD5="nX8E8gJ7n2e5N2r2PUk4gA==", IfNoneMatch="*",
            **HEADERS.s3_args(md5(b"x"))))
        assert urlsplit(request.url).path == s3_path("bucket", key), key
        theirs, ours = our_authorization(request)
        assert ours == theirs, key


def test_bytes_and_file_slices_land_byte_identical_and_a_taken_key_is_refused(
    direct: tuple[DirectPut, list[str]], s3_server: S3Server, bucket: str, r2_proxy: R2Proxy, tmp_path: Path,
) -> None:
    """Both body kinds arrive as written, with every header; a second PUT of a key gets KeyExistsError."""
    put, seen = direct
    small = bytearray(os.urandom(200_000))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    keys = HOSTILE_KEYS[:4]
    assert put.put(keys[0], small, md5_hex=md5(small), headers=HEADERS) == md5(small)
    with big.open("rb") as f:
        assert put.put(keys[1], FileSlice(f.fileno(), big.stat().st_size), md5_hex=md5(big.read_bytes()),
                       headers=HEADERS) == md5(big.read_bytes())
    with pytest.raises(KeyExistsError):
        put.put(keys[0], bytearray(b"other"), md5_hex=md5(b"other"), headers=HEADERS)
    assert s3_server.objects(bucket) == {keys[0]: bytes(small), keys[1]: big.read_bytes()}
    sent = r2_proxy.puts()
    assert [r.status for r in sent] == [200, 200, 412]
    assert all(r.headers["if-none-match"] == "*" and r.headers["x-amz-meta-prompt-id"] == "8c6f0c4e"
               and r.headers["cache-control"] == "public, max-age=60" for r in sent)
    assert seen == ["PutObject 200", "PutObject 200", "PutObject 412"]


def test_failures_are_classified_like_botocores_and_the_next_put_works(
    direct: tuple[DirectPut, list[str]], r2_proxy: R2Proxy, s3_server: S3Server, bucket: str,
) -> None:
    """503, a reset and a hang are transient (bucket scope for the last two); each is one observed attempt."""
    put, seen = direct
    data = bytearray(b"payload")
    r2_proxy.fail_next(1, status=503, code="ServiceUnavailable")
    with pytest.raises(TransientStoreError) as e503:
        put.put("k/a", data, md5_hex=md5(data), headers=HEADERS)
    r2_proxy.reset_next(1)
    with pytest.raises(TransientStoreError) as reset:
        put.put("k/b", data, md5_hex=md5(data), headers=HEADERS)
    r2_proxy.hang()
    with pytest.raises(TransientStoreError) as hung:
        put.put("k/c", data, md5_hex=md5(data), headers=HEADERS)
    r2_proxy.heal()
    assert (e503.value.code, reset.value.code, hung.value.code) == ("ServiceUnavailable", "ConnectionError", "Timeout")
    assert (reset.value.scope, hung.value.scope) == ("bucket", "bucket")
    assert put.put("k/d", data, md5_hex=md5(data), headers=HEADERS) == md5(data)
    assert seen == ["PutObject 503", "PutObject error", "PutObject error", "PutObject 200"]
    assert s3_server.objects(bucket) == {"k/d": b"payload"}


def test_a_refused_connection_is_a_store_failure_not_the_files(tmp_path: Path) -> None:
    """Nothing listening: a transient ConnectionError of bucket scope (never an OSError the uploader would
    take for an unreadable file)."""
    put, _ = direct_put_for(settings_for("http://127.0.0.1:9"))
    assert put is not None
    with pytest.raises(TransientStoreError) as refused:
        put.put("k", bytearray(b"x"), md5_hex=md5(b"x"), headers=HEADERS)
    assert (refused.value.code, refused.value.scope) == ("ConnectionError", "bucket")


def test_a_connection_the_store_closed_while_idle_is_replaced_without_an_error(
    direct: tuple[DirectPut, list[str]], r2_proxy: R2Proxy,
) -> None:
    """The store drops idle keep-alive connections (here: the proxy restarts); the next PUT opens a new one."""
    put, seen = direct
    data = bytearray(b"one")
    put.put("k/1", data, md5_hex=md5(data), headers=HEADERS)
    r2_proxy.down()
    r2_proxy.up()
    put.put("k/2", data, md5_hex=md5(data), headers=HEADERS)
    assert seen == ["PutObject 200", "PutObject 200"]


def test_wrong_secret_and_a_lying_store_are_refused_through_s3store(
    r2_proxy: R2Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server,
) -> None:
    """A bad secret is R2's SignatureDoesNotMatch (permanent, bucket scope, with its hint); a 200 without an
    ETag proves nothing (transient ETagMissing)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(r2_proxy.ca_bundle))
    bad = settings_for(r2_proxy.endpoint, bucket, secret_access_key="wrong-secret")
    put, _ = direct_put_for(bad, secrets=["wrong-secret"])
    store = S3Store(make_client(bad), bucket, direct=put)
    with pytest.raises(PermanentStoreError) as refused:
        store.put("k", bytearray(b"x"), md5_hex=md5(b"x"), headers=HEADERS)
    assert (refused.value.code, refused.value.scope) == ("SignatureDoesNotMatch", "bucket")
    assert "SIDECAR_SECRET_ACCESS_KEY" in refused.value.hint and "wrong-secret" not in str(refused.value)
    good = settings_for(r2_proxy.endpoint, bucket)
    store = S3Store(make_client(good), bucket, direct=direct_put_for(good)[0])
    r2_proxy.answer_without_etag(1, forward=False)
    with pytest.raises(TransientStoreError) as lied:
        store.put("k", bytearray(b"x"), md5_hex=md5(b"x"), headers=HEADERS)
    assert lied.value.code == "ETagMissing"
    assert s3_server.objects(bucket) == {}


def test_botocore_sends_where_the_direct_path_would_not_be_the_same_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Turned off, keys from the credential chain, a proxy, an endpoint with a path: each says why."""
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    url = "https://acct.r2.cloudflarestorage.com"
    assert direct_put_for(settings_for(url))[0] is not None
    cases = {
        "SIDECAR_DIRECT_PUT=false": settings_for(url, direct_put=False),
        "credential chain": settings_for(url, access_key_id=None, secret_access_key=None),
        "has a path": settings_for(url + "/prefix"),
    }
    for why, settings in cases.items():
        put, reason = direct_put_for(settings)
        assert put is None and why in reason
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:3128")
    put, reason = direct_put_for(settings_for(url))
    assert put is None and "proxy" in reason
    assert not DirectPut.accepts(ObjectHeaders("image/png", metadata=(("prompt-id", "é"),)))


def test_a_file_that_shrinks_while_it_is_sent_is_the_files_problem_not_the_stores(
    direct: tuple[DirectPut, list[str]], s3_server: S3Server, bucket: str, tmp_path: Path,
) -> None:
    """Truncated between hashing and sending: a transient IncompleteBody of object scope, nothing stored,
    nothing reported to StoreHealth, and the next PUT goes out on a fresh connection."""
    put, seen = direct
    big = tmp_path / "video.mp4"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    with big.open("rb") as f:
        body = FileSlice(f.fileno(), big.stat().st_size)
        os.truncate(big, 1024 * 1024 + 5)
        with pytest.raises(TransientStoreError) as short:
            put.put("k/video.mp4", body, md5_hex="0" * 32, headers=HEADERS)
    assert (short.value.code, short.value.scope) == ("IncompleteBody", "object")
    assert seen == []
    data = bytearray(b"next")
    assert put.put("k/next.png", data, md5_hex=md5(data), headers=HEADERS) == md5(data)
    assert s3_server.objects(bucket) == {"k/next.png": b"next"}


def test_parts_go_direct_signed_as_botocore_signs_them_and_assemble_byte_identical(
    r2_proxy: R2Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server,
) -> None:
    """UploadPart on the direct path: its Authorization equals botocore's for the same part (https, where
    botocore does not hash the payload either), the verifying proxy accepts every part with the signed
    Content-MD5 and no SHA-256 of the payload, and the completed object is the bytes sent."""
    upload_id = "2~a+b/c=d"  # the characters an upload id may carry that the query must encode
    client = make_client(settings_for("https://127.0.0.1:9"))
    for key in HOSTILE_KEYS:
        request = botocore_request(client, "UploadPart", lambda k=key: client.upload_part(
            Bucket="bucket", Key=k, UploadId=upload_id, PartNumber=7, Body=b"y" * 1000,
            ContentMD5="nX8E8gJ7n2e5N2r2PUk4gA=="))
        url = urlsplit(request.url)
        assert sorted(url.query.split("&")) == part_query(7, upload_id).split("&"), key  # same pairs, sorted
        assert request.headers["x-amz-content-sha256"] in ("UNSIGNED-PAYLOAD", b"UNSIGNED-PAYLOAD")
        theirs, ours = our_authorization(request, query=part_query(7, upload_id))
        assert ours == theirs, key

    monkeypatch.setenv("AWS_CA_BUNDLE", str(r2_proxy.ca_bundle))
    good = settings_for(r2_proxy.endpoint, bucket)
    seen: list[str] = []
    store = S3Store(make_client(good), bucket, direct=direct_put_for(good, observer=lambda o, s: seen.append(o))[0])
    key = HOSTILE_KEYS[1]
    chunks = [bytearray(os.urandom(5 * 1024 * 1024)), bytearray(os.urandom(123_457))]
    upload = store.create_multipart(key, md5_hex=None, headers=HEADERS)
    etags = [store.upload_part(key, upload, n, data) for n, data in enumerate(chunks, start=1)]
    assert etags == [md5(c) for c in chunks]
    store.complete_multipart(key, upload, etags)
    assert s3_server.objects(bucket) == {key: b"".join(chunks)}
    sent = r2_proxy.parts()
    assert [(r.status, r.headers["x-amz-content-sha256"], r.payload_len) for r in sent] == [
        (200, "UNSIGNED-PAYLOAD", len(c)) for c in chunks]
    assert seen.count("UploadPart") == 2
