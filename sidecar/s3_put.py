"""A lean signed PutObject: botocore's own SigV4 signer and connection pool, without the client machinery.

Why: a boto3 ``put_object`` spends ~1.9 ms of CPU per request on this kind of machine (parameter
validation, endpoint rules, event hooks, user agent, response parsing); signing the same request with
botocore's ``S3SigV4Auth`` and sending it on the client's own ``URLLib3Session`` takes ~0.9 ms. PUT is
the one request per file, so it is the one that sets the daemon's CPU per file (bench/ measures it).

Everything that matters is shared with the boto3 client it is built from: credentials (refreshed as the
client refreshes them), the TLS settings and CA bundle, timeouts and the connection pool. Failures are
raised as the same botocore exceptions the client would raise (``ClientError`` with the parsed S3 error,
or its connection errors), so :func:`sidecar.store_s3.classify` treats both paths alike. Path-style URLs
only: :func:`LeanPut.available` says when the client's addressing allows it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import botocore
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError

from sidecar import __version__

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

USER_AGENT = f"comfyui-r2-sidecar/{__version__} botocore/{botocore.__version__}"


def _error_response(status: int, body: bytes) -> dict[str, Any]:
    code, message = "", ""
    try:
        root = ET.fromstring(body)  # noqa: S314 - a small error document from the configured endpoint
        code = root.findtext("Code") or ""
        message = root.findtext("Message") or ""
    except ET.ParseError:
        pass
    return {"Error": {"Code": code or str(status), "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status}}


class LeanPut:
    """Sends PutObject requests signed like boto3 would sign them, on the client's own HTTP session."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self._base = f"{str(client.meta.endpoint_url).rstrip('/')}/{quote(bucket, safe='')}/"
        self._region = client.meta.region_name
        inner: Any = client
        self._session = inner._endpoint.http_session
        self._signer = inner._request_signer

    @staticmethod
    def available(client: S3Client) -> bool:
        """True when the client uses path-style URLs and exposes the parts this path reuses."""
        anyclient: Any = client
        style = (anyclient.meta.config.s3 or {}).get("addressing_style")
        return style == "path" and hasattr(anyclient, "_endpoint") and hasattr(anyclient, "_request_signer")

    def put(self, key: str, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """PUT ``data`` at ``key`` with ``headers``; the response headers on 2xx, else a raised ClientError."""
        request = AWSRequest(method="PUT", url=self._base + quote(key, safe="/~"), data=data,
                             headers={"User-Agent": USER_AGENT, **headers})
        # As boto3 does for a PutObject body: over https with a Content-MD5 the payload is not hashed into
        # the signature (UNSIGNED-PAYLOAD); over plain http it is.
        request.context["has_streaming_input"] = True
        credentials = self._signer._credentials.get_frozen_credentials()
        S3SigV4Auth(credentials, "s3", self._region).add_auth(request)
        response = self._session.send(request.prepare())
        status = int(response.status_code)
        if 200 <= status < 300:
            return {"ETag": response.headers.get("ETag", ""), "HTTPStatusCode": status}
        raise ClientError(_error_response(status, response.content), "PutObject")  # type: ignore[arg-type]
