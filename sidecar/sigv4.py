"""AWS Signature Version 4 for one S3 request with an unsigned payload, in the standard library alone.

The algorithm is AWS's published one (``Authorization: AWS4-HMAC-SHA256 ...``): a canonical request of the
method, the URI-encoded path, the query, the signed headers (lower-case names, trimmed values, sorted), and
``UNSIGNED-PAYLOAD`` in place of the body's SHA-256 -- the form botocore itself sends over https, and the
one the daemon's boto3 client is configured for everywhere (``payload_signing_enabled=False``): integrity
comes from the Content-MD5 header, which is signed. tests/test_sigv4.py checks each signature against
the one botocore computes for the same request.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from urllib.parse import quote

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
ALGORITHM = "AWS4-HMAC-SHA256"


def s3_path(bucket: str, key: str) -> str:
    """The path of ``key`` in ``bucket`` (path-style), URI-encoded once as S3 wants: every byte but
    ``A-Za-z0-9-._~`` and ``/`` as %XX of its UTF-8 form."""
    return "/" + quote(bucket, safe="") + "/" + quote(key, safe="/~")


def _canonical_value(value: str) -> str:
    return " ".join(value.split())  # trimmed, inner runs of spaces folded to one


class SigV4Signer:
    """Signs requests for one access key, region and service; the derived key is kept per UTC day."""

    def __init__(self, access_key_id: str, secret_access_key: str, region: str, *, service: str = "s3",
                 clock: Callable[[], float] = time.time) -> None:
        self._access_key_id = access_key_id
        self._secret = secret_access_key
        self._region = region
        self._service = service
        self._clock = clock
        self._day_key: tuple[str, bytes] = ("", b"")

    def __repr__(self) -> str:  # never the secret
        return f"SigV4Signer(region={self._region!r}, service={self._service!r})"

    def _signing_key(self, day: str) -> bytes:
        cached_day, key = self._day_key
        if cached_day != day:
            key = ("AWS4" + self._secret).encode()
            for part in (day, self._region, self._service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._day_key = (day, key)  # one tuple assignment: readers on other threads see a whole pair
        return key

    def sign(self, method: str, path: str, headers: Iterable[tuple[str, str]], *, query: str = "",
             amz_date: str | None = None) -> list[tuple[str, str]]:
        """The headers to send: ``headers`` (which must include ``host``) plus x-amz-date,
        x-amz-content-sha256 and Authorization. ``path`` is already URI-encoded (:func:`s3_path`)."""
        if amz_date is None:
            amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        day = amz_date[:8]
        sent = [*headers, ("x-amz-content-sha256", UNSIGNED_PAYLOAD), ("x-amz-date", amz_date)]
        canonical = sorted((name.lower(), _canonical_value(value)) for name, value in sent)
        signed_names = ";".join(name for name, _ in canonical)
        request = "\n".join((
            method, path, query, *(f"{name}:{value}" for name, value in canonical), "",
            signed_names, UNSIGNED_PAYLOAD,
        ))
        scope = f"{day}/{self._region}/{self._service}/aws4_request"
        to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        authorization = (f"{ALGORITHM} Credential={self._access_key_id}/{scope}, "
                         f"SignedHeaders={signed_names}, Signature={signature}")
        return [*sent, ("Authorization", authorization)]
