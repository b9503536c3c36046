"""The test infrastructure itself: moto subprocess + R2-strict, recording, fault-injecting proxy."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from support.proxy import R2Proxy, R2Rules, content_md5, r2_safe_config
from support.s3server import S3Server
from support.tls import TlsFiles
from support.waiting import wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# botocore defaults (aws-chunked CRC32 trailers over https) with a single attempt.
# Note: retries={"max_attempts": 1} would mean one *retry*; total_max_attempts counts the first try.
DEFAULT_CHECKSUMS = Config(retries={"total_max_attempts": 1, "mode": "standard"})


@pytest.fixture(autouse=True)
def unconditional_writes_allowed(request: pytest.FixtureRequest) -> None:
    """These tests exercise the proxy's other rules with plain boto3 writes; the conditional-write rule,
    which guards the sidecar, has its own test below."""
    for name in ("r2_proxy", "r2_proxy_http"):
        if name in request.fixturenames:
            request.getfixturevalue(name).rules.require_conditional_writes = False


def test_unconditional_writes_are_refused(r2_proxy: R2Proxy, bucket: str, s3_server: S3Server) -> None:
    """With the rule on (the default), a PutObject or CompleteMultipartUpload without If-None-Match: * never
    reaches the store: 400 UnconditionalWrite. With it, both pass."""
    r2_proxy.rules.require_conditional_writes = True
    client = r2_proxy.client(r2_safe_config())
    with pytest.raises(ClientError) as plain:
        client.put_object(Bucket=bucket, Key="k", Body=b"x", ContentMD5=content_md5(b"x"))
    assert error_of(plain) == (400, "UnconditionalWrite")
    client.put_object(Bucket=bucket, Key="k", Body=b"x", ContentMD5=content_md5(b"x"), IfNoneMatch="*")
    upload = client.create_multipart_upload(Bucket=bucket, Key="m")["UploadId"]
    etag = client.upload_part(Bucket=bucket, Key="m", UploadId=upload, PartNumber=1, Body=b"p",
                              ContentMD5=content_md5(b"p"))["ETag"]
    parts = {"Parts": [{"ETag": etag, "PartNumber": 1}]}
    with pytest.raises(ClientError) as complete:
        client.complete_multipart_upload(Bucket=bucket, Key="m", UploadId=upload, MultipartUpload=parts)
    assert error_of(complete) == (400, "UnconditionalWrite")
    client.complete_multipart_upload(Bucket=bucket, Key="m", UploadId=upload, MultipartUpload=parts, IfNoneMatch="*")
    assert s3_server.objects(bucket) == {"k": b"x", "m": b"p"}


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str]:
    response = exc.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def raw_request(
    proxy: R2Proxy, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One unsigned request through a plain-http proxy (moto checks no signature)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def put_safe(client: S3Client, bucket: str, key: str, data: bytes) -> str:
    return client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=content_md5(data))["ETag"]


# -- R2 strictness ---------------------------------------------------------------------------------------


def test_default_boto3_client_gets_501_over_https(
    r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """A default-config boto3 client sends an aws-chunked CRC32 trailer over https and gets 501."""
    client = r2_proxy.client(DEFAULT_CHECKSUMS)
    with pytest.raises(ClientError) as exc:
        client.put_object(Bucket=bucket, Key="a.png", Body=b"png")
    assert error_of(exc) == (501, "NotImplemented")
    [rec] = r2_proxy.puts()
    assert rec.headers["content-encoding"] == "aws-chunked"
    assert rec.headers["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert rec.headers["x-amz-trailer"] == "x-amz-checksum-crc32"
    assert (rec.status, rec.origin, rec.payload_len) == (501, "rule", 3)
    assert s3_server.objects(bucket) == {}


def test_default_boto3_client_over_plain_http_sends_no_trailer(r2_proxy_http: R2Proxy, bucket: str) -> None:
    """Over plain http botocore puts the CRC32 in a header instead, which is why r2_proxy is https."""
    client = r2_proxy_http.client(DEFAULT_CHECKSUMS)
    client.put_object(Bucket=bucket, Key="a.png", Body=b"png")
    [rec] = r2_proxy_http.puts()
    assert "content-encoding" not in rec.headers
    assert "x-amz-checksum-crc32" in rec.headers
    assert rec.status == 200


def test_safe_client_with_content_md5_round_trips(
    r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """checksums when_required + explicit ContentMD5 succeeds; ETag is the hex MD5; bytes round-trip."""
    client = r2_proxy.client(r2_safe_config())
    data = b"\x89PNG tiny \x00\xff"
    etag = put_safe(client, bucket, "dir with space/ümlaut %date:yyyy%.png", data)
    assert etag.strip('"') == hashlib.md5(data).hexdigest()
    got = client.get_object(Bucket=bucket, Key="dir with space/ümlaut %date:yyyy%.png")["Body"].read()
    assert got == data
    assert s3_server.objects(bucket) == {"dir with space/ümlaut %date:yyyy%.png": data}
    [put] = r2_proxy.puts()
    assert put.key == "dir with space/ümlaut %date:yyyy%.png"
    assert "content-encoding" not in put.headers
    assert (put.status, put.body_len) == (200, len(data))


def test_wrong_content_md5_gets_bad_digest(r2_proxy: R2Proxy, s3_server: S3Server, bucket: str) -> None:
    """A Content-MD5 that does not match the body is refused with 400 BadDigest and nothing is stored."""
    client = r2_proxy.client()
    with pytest.raises(ClientError) as exc:
        client.put_object(Bucket=bucket, Key="a.png", Body=b"actual", ContentMD5=content_md5(b"other"))
    assert error_of(exc) == (400, "BadDigest")
    with pytest.raises(ClientError) as exc:
        client.put_object(Bucket=bucket, Key="a.png", Body=b"actual", ContentMD5="bm90LW1kNQ==")
    assert error_of(exc) == (400, "InvalidDigest")
    assert s3_server.objects(bucket) == {}


def test_if_none_match_on_existing_key_gets_412(
    r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """PUT If-None-Match:* succeeds on a new key and gets 412 PreconditionFailed on an existing one."""
    client = r2_proxy.client()
    client.put_object(
        Bucket=bucket, Key="k", Body=b"first", ContentMD5=content_md5(b"first"), IfNoneMatch="*"
    )
    with pytest.raises(ClientError) as exc:
        client.put_object(
            Bucket=bucket, Key="k", Body=b"second", ContentMD5=content_md5(b"second"), IfNoneMatch="*"
        )
    assert error_of(exc) == (412, "PreconditionFailed")
    assert s3_server.objects(bucket) == {"k": b"first"}
    # The proxy's own existence check (a HEAD upstream) is not recorded as a client request.
    assert [(r.operation, r.status, r.origin) for r in r2_proxy.requests] == [
        ("PutObject", 200, "upstream"),
        ("PutObject", 412, "rule"),
    ]


def test_key_over_1024_bytes_gets_invalid_object_name(
    r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """A key of 1025 UTF-8 bytes is InvalidObjectName; exactly 1024 bytes is accepted."""
    client = r2_proxy.client()
    too_long = "é" * 512 + "x"  # 1025 bytes, 513 characters
    with pytest.raises(ClientError) as exc:
        put_safe(client, bucket, too_long, b"x")
    assert error_of(exc) == (400, "InvalidObjectName")
    longest = "é" * 512  # 1024 bytes
    put_safe(client, bucket, longest, b"x")
    assert s3_server.objects(bucket) == {longest: b"x"}


def test_r2_unsupported_headers_get_501(r2_proxy_http: R2Proxy, bucket: str) -> None:
    """x-amz-tagging, an empty x-amz-storage-class and x-amz-checksum-crc64nvme are 501 NotImplemented."""
    for headers in (
        {"x-amz-tagging": "a=b"},
        {"x-amz-storage-class": ""},
        {"x-amz-checksum-crc64nvme": "AAAAAAAAAAA="},
    ):
        status, body = raw_request(r2_proxy_http, "PUT", f"/{bucket}/k", b"x", headers)
        assert status == 501, headers
        assert b"<Code>NotImplemented</Code>" in body
    status, _ = raw_request(r2_proxy_http, "PUT", f"/{bucket}/k", b"x", {"x-amz-storage-class": "STANDARD"})
    assert status == 200
    assert [r.status for r in r2_proxy_http.requests] == [501, 501, 501, 200]


def upload_parts(client: S3Client, bucket: str, key: str, parts: list[bytes]) -> tuple[str, list[str]]:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etags = [
        client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=part, ContentMD5=content_md5(part)
        )["ETag"]
        for n, part in enumerate(parts, start=1)
    ]
    return upload_id, etags


def complete(client: S3Client, bucket: str, key: str, upload_id: str, etags: list[str]) -> None:
    client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]},
    )


def test_multipart_parts_must_be_equal_size(r2_proxy: R2Proxy, s3_server: S3Server, bucket: str) -> None:
    """Unequal non-final parts get InvalidPart at completion; equal ones (shorter last) complete."""
    client = r2_proxy.client()
    upload_id, etags = upload_parts(client, bucket, "bad", [b"aaaa", b"bbb", b"cc"])
    with pytest.raises(ClientError) as exc:
        complete(client, bucket, "bad", upload_id, etags)
    assert error_of(exc) == (400, "InvalidPart")

    upload_id, etags = upload_parts(client, bucket, "good", [b"aaaa", b"bbbb", b"cc"])
    complete(client, bucket, "good", upload_id, etags)
    assert s3_server.objects(bucket) == {"good": b"aaaabbbbcc"}
    assert [r.part_number for r in r2_proxy.parts()] == [1, 2, 3, 1, 2, 3]
    assert r2_proxy.puts() == []  # UploadPart is not a PutObject


def test_min_part_size_rule_is_opt_in(r2_proxy: R2Proxy, bucket: str) -> None:
    """rules.min_part_size turns on R2's EntityTooSmall for small non-final parts."""
    r2_proxy.rules.min_part_size = 4
    client = r2_proxy.client()
    upload_id, etags = upload_parts(client, bucket, "small", [b"aaa", b"bbb", b"c"])
    with pytest.raises(ClientError) as exc:
        complete(client, bucket, "small", upload_id, etags)
    assert error_of(exc) == (400, "EntityTooSmall")


def test_non_strict_proxy_forwards_aws_chunked(
    s3_server: S3Server, tls_files: TlsFiles, bucket: str
) -> None:
    """With strict=False the default client's aws-chunked upload passes and moto decodes it."""
    with R2Proxy(s3_server.endpoint, strict=False, tls=tls_files) as proxy:
        proxy.client(DEFAULT_CHECKSUMS).put_object(Bucket=bucket, Key="k", Body=b"chunked body")
        [rec] = proxy.puts()
        assert rec.headers["content-encoding"] == "aws-chunked"
        assert rec.body_len > rec.payload_len == len(b"chunked body")
    assert proxy.rules == R2Rules.off()
    assert s3_server.objects(bucket) == {"k": b"chunked body"}


# -- fault injection -------------------------------------------------------------------------------------


def connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_down_refuses_connections_and_up_restores_same_port(r2_proxy: R2Proxy, bucket: str) -> None:
    """down() closes the listener (connection refused, pooled connections cut); up() rebinds the port."""
    client = r2_proxy.client()
    put_safe(client, bucket, "before", b"1")  # leaves a pooled keep-alive connection
    port, endpoint = r2_proxy.port, r2_proxy.endpoint
    r2_proxy.down()
    assert connect_refused(port)
    with pytest.raises(EndpointConnectionError):
        put_safe(client, bucket, "during", b"2")
    r2_proxy.up()
    assert (r2_proxy.port, r2_proxy.endpoint) == (port, endpoint)
    put_safe(client, bucket, "after", b"3")
    assert [r.key for r in r2_proxy.puts()] == ["before", "after"]


def test_fail_next_returns_status_then_heals(r2_proxy: R2Proxy, s3_server: S3Server, bucket: str) -> None:
    """fail_next(2) answers two requests with the injected XML error, the third goes through."""
    client = r2_proxy.client()
    r2_proxy.fail_next(2, status=503, code="SlowDown")
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            put_safe(client, bucket, "k", b"x")
        assert error_of(exc) == (503, "SlowDown")
    put_safe(client, bucket, "k", b"x")
    assert [(r.status, r.error_code, r.origin) for r in r2_proxy.requests] == [
        (503, "SlowDown", "fault"),
        (503, "SlowDown", "fault"),
        (200, None, "upstream"),
    ]
    assert s3_server.objects(bucket) == {"k": b"x"}


def test_fail_all_until_heal_and_when_filter(r2_proxy: R2Proxy, bucket: str) -> None:
    """fail_all(when=...) fails only matching requests, every time, until heal()."""
    client = r2_proxy.client()
    r2_proxy.fail_all(500, "InternalError", when=lambda r: r.key == "bad")
    put_safe(client, bucket, "good", b"1")
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            put_safe(client, bucket, "bad", b"2")
        assert error_of(exc) == (500, "InternalError")
    r2_proxy.heal()
    put_safe(client, bucket, "bad", b"2")
    assert [(r.key, r.status) for r in r2_proxy.puts()] == [
        ("good", 200), ("bad", 500), ("bad", 500), ("bad", 200),
    ]


def test_reset_next_sends_rst_without_answer(r2_proxy_http: R2Proxy, bucket: str) -> None:
    """reset_next(1) reads the request and aborts the connection with RST; the next request is served."""
    r2_proxy_http.reset_next(1)
    with pytest.raises(ConnectionResetError):
        raw_request(r2_proxy_http, "PUT", f"/{bucket}/k", b"x")
    assert raw_request(r2_proxy_http, "PUT", f"/{bucket}/k", b"x")[0] == 200
    assert [r.status for r in r2_proxy_http.requests] == ["reset", 200]


def test_reset_over_https_is_a_connection_error_for_boto3(
    r2_proxy: R2Proxy, s3_server: S3Server, bucket: str
) -> None:
    """Over TLS a reset surfaces in botocore as a connection error (retryable), not a ClientError."""
    r2_proxy.reset_next(1)
    with pytest.raises((HTTPClientError, BotoConnectionError)):
        put_safe(r2_proxy.client(), bucket, "k", b"x")
    put_safe(r2_proxy.client(), bucket, "k", b"y")
    assert [r.status for r in r2_proxy.requests] == ["reset", 200]
    assert s3_server.objects(bucket) == {"k": b"y"}


def test_hang_holds_requests_until_healed(r2_proxy: R2Proxy, bucket: str) -> None:
    """hang() reads and never answers; heal() closes the hung connection unanswered and serves again."""
    client = r2_proxy.client(r2_safe_config(read_timeout=30))
    r2_proxy.hang()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            put_safe(client, bucket, "k", b"x")
        except Exception as exc:  # the outcome is asserted below
            errors.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    wait_until(lambda: r2_proxy.count(predicate=lambda r: r.status == "hang") == 1, timeout=5,
               message="request never reached the hang")
    assert worker.is_alive()  # still waiting for an answer
    r2_proxy.heal()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], (HTTPClientError, BotoConnectionError))
    put_safe(client, bucket, "k", b"x")


def test_delay_slows_matching_requests(r2_proxy: R2Proxy, bucket: str) -> None:
    """delay(s, when=...) waits before handling matching requests only; delay(0) turns it off."""
    client = r2_proxy.client()
    r2_proxy.delay(0.2, when=lambda r: r.key == "slow")
    start = time.monotonic()
    put_safe(client, bucket, "slow", b"1")
    assert time.monotonic() - start >= 0.2
    put_safe(client, bucket, "fast", b"2")
    r2_proxy.delay(0)
    put_safe(client, bucket, "slow", b"3")
    # The proxy measures its own handling time, which is robust against a loaded test machine.
    slow, fast, slow_again = ((r.key, r.duration or 0.0) for r in r2_proxy.puts())
    assert slow[0] == "slow" and slow[1] >= 0.2
    assert fast[0] == "fast" and fast[1] < 0.2
    assert slow_again[0] == "slow" and slow_again[1] < 0.2


# -- recording -------------------------------------------------------------------------------------------


def test_requests_are_counted_exactly(r2_proxy: R2Proxy, s3_server: S3Server, bucket: str) -> None:
    """Every client request is recorded once with its operation; direct server access is not."""
    client = r2_proxy.client()
    for i in range(3):
        put_safe(client, bucket, f"f{i}.png", bytes([i]) * (i + 1))
    client.head_object(Bucket=bucket, Key="f0.png")
    client.get_object(Bucket=bucket, Key="f1.png")["Body"].read()
    client.list_objects_v2(Bucket=bucket)
    assert s3_server.objects(bucket)  # bypasses the proxy
    assert r2_proxy.count() == 6
    assert r2_proxy.count(method="PUT") == 3
    assert [r.body_len for r in r2_proxy.puts()] == [1, 2, 3]
    assert r2_proxy.count(operation="HeadObject") == len(r2_proxy.heads()) == 1
    assert len(r2_proxy.gets()) == 1
    assert [r.operation for r in r2_proxy.lists()] == ["ListObjectsV2"]
    assert r2_proxy.count(predicate=lambda r: r.query.get("list-type") == "2") == 1
    assert all(r.ok and r.bucket == bucket for r in r2_proxy.requests)
    r2_proxy.clear()
    assert r2_proxy.count() == 0


def test_s3_server_reset_wipes_everything(s3_server: S3Server) -> None:
    """POST /moto-api/reset drops every bucket on the session server."""
    s3_server.make_bucket("to-be-reset")
    s3_server.reset()
    assert s3_server.client().list_buckets()["Buckets"] == []
