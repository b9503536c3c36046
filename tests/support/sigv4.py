"""An independent AWS Signature V4 verifier for the test proxy (moto checks no signature; R2 does).

Written from the published algorithm, not from botocore, so a request that boto3 or the sidecar's lean
PUT path signs wrongly is refused here the way R2 would refuse it (403 SignatureDoesNotMatch).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import urllib.parse

AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
    r"\s*SignedHeaders=(?P<signed>[^,]+),\s*Signature=(?P<signature>[0-9a-f]{64})"
)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _canonical_query(query: str) -> str:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    encoded = sorted((urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def verify(method: str, raw_path: str, headers: dict[str, str], body: bytes, secret: str) -> str | None:
    """None when the request's SigV4 signature is valid for ``secret``; otherwise why it is not.

    ``headers`` must hold every header as received (lower-cased names), Authorization included;
    ``raw_path`` is the request target as sent (still percent-encoded, with its query).
    """
    match = AUTH_RE.fullmatch(headers.get("authorization", "").strip())
    if match is None:
        return "no AWS4-HMAC-SHA256 Authorization header"
    path, _, query = raw_path.partition("?")
    payload_hash = headers.get("x-amz-content-sha256", "")
    hashed = payload_hash != "UNSIGNED-PAYLOAD" and not payload_hash.startswith("STREAMING-")
    if hashed and payload_hash != hashlib.sha256(body).hexdigest():
        return "x-amz-content-sha256 does not match the body"
    signed = match["signed"].split(";")
    missing = [h for h in signed if h not in headers]
    if missing:
        return f"signed headers missing from the request: {missing}"
    canonical_headers = "".join(f"{h}:{' '.join(headers[h].split())}\n" for h in signed)
    canonical = "\n".join(
        [method, path or "/", _canonical_query(query), canonical_headers, match["signed"], payload_hash]
    )
    amz_date = headers.get("x-amz-date", "")
    scope = f"{match['date']}/{match['region']}/{match['service']}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(f"AWS4{secret}".encode(), match["date"])
    for part in (match["region"], match["service"], "aws4_request"):
        key = _hmac(key, part)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match["signature"]):
        return "signature does not match"
    return None
