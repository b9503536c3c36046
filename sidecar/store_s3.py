"""The S3 / Cloudflare R2 implementation of :class:`~sidecar.store.ObjectStore`, on boto3.

R2 quirks live in :func:`client_config` (checksums) and in :meth:`S3Store.put` (Content-MD5 and the
If-None-Match guard); :func:`sidecar.store_errors.classify` alone decides which failures are transient. See
the README's "R2 notes".
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from sidecar.errors import PermanentStoreError, StoreError, TransientStoreError
from sidecar.store import MD5_METADATA, Body, ObjectHeaders, ObjectInfo, composite_etag, is_md5
from sidecar.store_errors import classify

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from sidecar.config import Settings
    from sidecar.direct_put import DirectPut

RequestObserver = Callable[[str, str], None]
"""Called once per HTTP attempt with (operation, status) where status is the HTTP code or 'error'."""


def client_config(settings: Settings) -> Config:
    """botocore settings that R2 accepts.

    R2 quirk: boto3 >= 1.36 sends a CRC32 checksum as an ``aws-chunked`` trailer by default, which R2 has
    answered with 501 or SignatureDoesNotMatch. ``when_required`` turns that off; integrity comes from an
    explicit Content-MD5 instead. botocore's own retries are off: the uploader retries (tenacity for blips,
    the journal for outages), so an outage does not drain botocore's retry quota.

    ``payload_signing_enabled=False``: the signature covers the headers, Content-MD5 included, not a SHA-256
    of the body. That is what botocore already does over https for a streaming upload with a Content-MD5
    (R2's case); saying it explicitly makes a plain-http endpoint (a local MinIO, the bench) send the same
    form instead of hashing every body a second time (a 2.6 MB PNG: ~7 ms of CPU). The store still refuses
    a body that does not match the signed Content-MD5 (BadDigest).
    """
    return Config(
        region_name=settings.region,
        signature_version="s3v4",
        # Path-style on every explicit endpoint (R2 included): one host for all buckets.
        s3={"addressing_style": "path" if settings.resolved_endpoint else "auto", "payload_signing_enabled": False},
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        max_pool_connections=settings.workers + settings.part_concurrency + 4,
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="comfyui-r2-sidecar",
    )


def make_client(settings: Settings, *, timeout_s: float | None = None,
                session: boto3.session.Session | None = None) -> S3Client:
    """A boto3 S3 client for R2 (from the account id), any S3 endpoint URL, or AWS itself.

    ``timeout_s`` caps the connect and read timeouts (the health probe must not hang for a minute).
    ``session``: clients of one session share botocore's parsed S3 model (a second session costs ~12 MB).
    """
    key_id = secret = None
    if settings.access_key_id is not None and settings.secret_access_key is not None:
        key_id = settings.access_key_id.get_secret_value()
        secret = settings.secret_access_key.get_secret_value()
    session = session or boto3.session.Session()
    config = client_config(settings)
    if timeout_s is not None:
        config = config.merge(Config(connect_timeout=min(timeout_s, settings.connect_timeout_s),
                                     read_timeout=min(timeout_s, settings.read_timeout_s)))
    return session.client(
        "s3", endpoint_url=settings.resolved_endpoint, config=config,
        aws_access_key_id=key_id, aws_secret_access_key=secret,
    )


def make_clients(settings: Settings, *, probe_timeout_s: float) -> tuple[S3Client, S3Client]:
    """The uploads' client and the health probe's (short timeouts), from one session."""
    session = boto3.session.Session()
    return (make_client(settings, session=session),
            make_client(settings, timeout_s=probe_timeout_s, session=session))


def _md5_b64(md5_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")


def _etag(response: Any) -> str:
    return str(response.get("ETag", "")).strip('"')


def _proven(etag: str, expected: str, *, operation: str, key: str) -> str:
    """The store's answer proves it kept our bytes only if its ETag is the one those bytes give."""
    if etag == expected:
        return etag
    code, what = ("ETagMissing", "no ETag") if not etag else ("ETagMismatch", f"ETag {etag}")
    raise TransientStoreError(f"the store answered with {what}, expected {expected}", operation=operation,
                              key=key, code=code)


class S3Store:
    """ObjectStore on one bucket of an S3-compatible endpoint, through boto3's public client API only.

    Every request goes through the client, so the ``needs-retry`` event reports every HTTP attempt (its
    status, or ``error`` for no answer) to ``observer`` -- the one feed of
    :class:`sidecar.store_health.StoreHealth`.
    """

    def __init__(
        self, client: S3Client, bucket: str, *, secrets: Iterable[str] = (), observer: RequestObserver | None = None,
        direct: DirectPut | None = None,
    ) -> None:
        self._client = client
        self._direct = direct  # single PUTs without botocore's machinery (sidecar.direct_put), where it applies
        self._bucket = bucket
        self._secrets = tuple(s for s in secrets if s)
        self.endpoint = str(client.meta.endpoint_url)
        if observer is not None:
            client.meta.events.register("needs-retry.s3", self._make_hook(observer))

    @staticmethod
    def _make_hook(observer: RequestObserver) -> Callable[..., None]:
        def on_attempt(response: Any = None, operation: Any = None, **_: Any) -> None:
            status = "error"
            if response is not None:
                status = str(response[0].status_code)
            observer(getattr(operation, "name", "unknown"), status)

        return on_attempt

    def _call(self, operation: str, key: str, fn: Callable[..., Any], **params: Any) -> Any:
        try:
            return fn(Bucket=self._bucket, **params)
        except Exception as exc:  # every failure is classified; classify re-raises what it does not know
            raise classify(exc, operation=operation, key=key, secrets=self._secrets) from None

    def put(self, key: str, data: Body, *, md5_hex: str, headers: ObjectHeaders) -> str:
        # R2 quirk: an explicit Content-MD5 is the integrity check R2 honours (BadDigest on mismatch), and its
        # single-part ETag is that MD5, so the upload is verified without a HEAD. If-None-Match makes the
        # write refuse to replace an object (ComfyUI reuses names after local deletes).
        if self._direct is not None and self._direct.accepts(headers):  # the same request, on http.client
            return _proven(self._direct.put(key, data, md5_hex=md5_hex, headers=headers), md5_hex,
                           operation="PutObject", key=key)
        response = self._call(
            "PutObject", key, self._client.put_object, Key=key, Body=data, ContentLength=len(data),
            ContentMD5=_md5_b64(md5_hex), IfNoneMatch="*", **headers.s3_args(md5_hex),
        )
        return _proven(_etag(response), md5_hex, operation="PutObject", key=key)

    def _existing(self, operation: str, key: str, fn: Callable[..., Any]) -> Any:
        """The answer of a read of ``key``, or None when the key does not exist (404)."""
        try:
            return self._call(operation, key, fn, Key=key)
        except PermanentStoreError as exc:
            if exc.code in ("NoSuchKey", "NotFound"):
                return None
            raise

    def head(self, key: str) -> ObjectInfo | None:
        response = self._existing("HeadObject", key, self._client.head_object)
        if response is None:
            return None
        etag = _etag(response)
        claimed = response.get("Metadata", {}).get(MD5_METADATA)
        # A single-part ETag is the store's own MD5 of what it holds: believe it over metadata anyone can set.
        md5 = etag if is_md5(etag) else claimed
        return ObjectInfo(key=key, size=int(response.get("ContentLength", 0)), etag=etag, md5=md5,
                          claimed_md5=claimed)

    def read_md5(self, key: str) -> str | None:
        response = self._existing("GetObject", key, self._client.get_object)
        if response is None:
            return None
        digest = hashlib.md5(usedforsecurity=False)
        body = response["Body"]
        try:
            for chunk in iter(lambda: body.read(1024 * 1024), b""):
                digest.update(chunk)
        except Exception as exc:  # a connection cut mid-body: classified like any other failure
            raise classify(exc, operation="GetObject", key=key, secrets=self._secrets) from None
        finally:
            body.close()
        return digest.hexdigest()

    def create_multipart(self, key: str, *, md5_hex: str | None, headers: ObjectHeaders) -> str:
        response = self._call(
            "CreateMultipartUpload", key, self._client.create_multipart_upload, Key=key, **headers.s3_args(md5_hex),
        )
        return str(response["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        md5_hex = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if self._direct is not None and isinstance(data, bytearray):
            return _proven(self._direct.upload_part(key, upload_id, number, data, md5_hex=md5_hex), md5_hex,
                           operation="UploadPart", key=key)
        response = self._call(
            "UploadPart", key, self._client.upload_part, Key=key, UploadId=upload_id, PartNumber=number,
            Body=data, ContentMD5=_md5_b64(md5_hex),
        )
        return _proven(_etag(response), md5_hex, operation="UploadPart", key=key)

    def complete_multipart(self, key: str, upload_id: str, etags: list[str], *, whole_md5: str = "") -> str:
        parts = [{"ETag": f'"{etag}"', "PartNumber": n} for n, etag in enumerate(etags, start=1)]
        response = self._call(
            "CompleteMultipartUpload", key, self._client.complete_multipart_upload, Key=key,
            UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*",
        )
        etag = _etag(response)
        if whole_md5 and etag == whole_md5:  # e.g. localbucket: the whole object's MD5, not S3's composite
            return etag
        return _proven(etag, composite_etag(etags), operation="CompleteMultipartUpload", key=key)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._call("AbortMultipartUpload", key, self._client.abort_multipart_upload, Key=key, UploadId=upload_id)
        except PermanentStoreError as exc:
            if exc.code != "NoSuchUpload":
                raise

    def check(self) -> str:
        try:
            self._call("HeadBucket", "", self._client.head_bucket)
        except StoreError as exc:
            where = f"bucket {self._bucket!r} at {self.endpoint}: {exc.code} ({exc.detail})"
            raise type(exc)(where, operation="HeadBucket", code=exc.code, hint=exc.hint, scope=exc.scope) from None
        return f"bucket {self._bucket!r} reachable at {self.endpoint} with these credentials"

    def presign_get(self, key: str, ttl_s: int) -> str:
        """A GET URL valid for ``ttl_s`` seconds, signed locally (no request); it carries no secret key."""
        return str(self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=int(ttl_s)))
