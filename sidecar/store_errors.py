"""Which store failures are transient, permanent or a key that exists: one decision table for boto3's errors
(:func:`classify`) and for the answers of the lean PUT (:func:`from_answer`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import botocore.exceptions as bx

from sidecar.errors import KeyExistsError, PermanentStoreError, StoreError, TransientStoreError

TRANSIENT_CODES = frozenset(
    {
        "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
        "TooManyRequests", "RequestTimeTooSkewed", "BadDigest", "IncompleteBody", "OperationAborted",
        "ExpiredToken",
    }
)
BODYLESS_CODES = {
    ("HeadBucket", "404"): "NoSuchBucket",
    ("HeadObject", "404"): "NoSuchKey",
    ("", "403"): "AccessDenied",
    ("", "401"): "Unauthorized",
}
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout"})
# Errors that every request of this configuration would meet: pause all uploads, park no file.
BUCKET_CODES = frozenset(
    {
        "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoCredentials", "Unauthorized",
        "InvalidBucketName", "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidToken",
        "ConnectionError", "Timeout", "InternalError", "ServiceUnavailable",
    }
)
HINTS = {
    "AccessDenied": "check SIDECAR_ACCESS_KEY_ID / SIDECAR_SECRET_ACCESS_KEY and the token's bucket permissions",
    "InvalidAccessKeyId": "check SIDECAR_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "check SIDECAR_SECRET_ACCESS_KEY (and SIDECAR_REGION: 'auto' for R2)",
    "Unauthorized": "check the credentials; R2 also says this for checksum forms it does not support",
    "NoSuchBucket": "check SIDECAR_BUCKET and that the bucket exists at this endpoint",
    "NotImplemented": "the store rejected a request form (R2 rejects aws-chunked checksum trailers)",
    "InvalidObjectName": "shorten the folder or file name, or SIDECAR_KEY_TEMPLATE",
}

def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "**********")
    return text


def classify(
    exc: Exception, *, operation: str, key: str = "", secrets: Iterable[str] = ()
) -> StoreError:
    """Map any boto3/botocore failure to a transient, permanent or key-exists :class:`StoreError`."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bx.ClientError):
        err: dict[str, Any] = dict(exc.response.get("Error", {}))
        meta: dict[str, Any] = dict(exc.response.get("ResponseMetadata", {}))
        return from_answer(str(err.get("Code") or ""), int(meta.get("HTTPStatusCode") or 0),
                           str(err.get("Message") or ""), operation=operation, key=key, secrets=secrets)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return PermanentStoreError(
            "no credentials", operation=operation, key=key, code="NoCredentials",
            hint="set SIDECAR_ACCESS_KEY_ID and SIDECAR_SECRET_ACCESS_KEY", scope="bucket",
        )
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return TransientStoreError("timed out", operation=operation, key=key, code="Timeout", scope="bucket")
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | ConnectionError):
        message = f"connection failed ({type(exc).__name__})"
        return TransientStoreError(message, operation=operation, key=key, code="ConnectionError", scope="bucket")
    if isinstance(exc, bx.BotoCoreError):
        return TransientStoreError(_scrub(str(exc), secrets), operation=operation, key=key, code=type(exc).__name__)
    raise exc


def from_answer(
    code: str, status: int, text: str, *, operation: str, key: str = "", secrets: Iterable[str] = ()
) -> StoreError:
    """The error a store's non-2xx answer means: its error ``code`` (empty when the body had none), HTTP
    ``status`` and ``text`` (its message; secrets scrubbed)."""
    code = code or str(status or "ClientError")
    if code.isdigit():  # HEAD answers carry no body, so no error code: name the usual meaning
        code = BODYLESS_CODES.get((operation, code), BODYLESS_CODES.get(("", code), code))
    text = _scrub(text, secrets)
    message = f"{code} ({status}): {text}" if text and text != code else f"{code} ({status})"
    if status == 412 or code == "PreconditionFailed":
        return KeyExistsError(message, operation=operation, key=key, code="PreconditionFailed")
    scope = _scope(code, status, operation)
    if code in TRANSIENT_CODES or (status >= 500 and code != "NotImplemented") or status == 429:
        return TransientStoreError(message, operation=operation, key=key, code=code, scope=scope)
    return PermanentStoreError(message, operation=operation, key=key, code=code, hint=HINTS.get(code, ""),
                               scope=scope)


def _scope(code: str, status: int, operation: str) -> str:
    """bucket: every request of this configuration would fail so; object: this key only.

    An AccessDenied on an object request may be a token limited to some prefixes: it stays object-scoped
    here, and :class:`sidecar.store_health.StoreHealth` asks the bucket itself before pausing everything.
    """
    if code in THROTTLE_CODES or status == 429:
        return "object"  # the store answers, and asks this request to wait: the file backs off
    if code in BUCKET_CODES or status >= 500 or (code == "AccessDenied" and operation == "HeadBucket"):
        return "bucket"
    return "object"
