"""Where a client can fetch a stored object: a public bucket domain, a presigned GET URL, or nothing.

``SIDECAR_PUBLIC_BASE_URL`` wins (base + the key, percent-encoded per segment, ``/`` kept); else
``SIDECAR_PRESIGN_TTL_S`` > 0 signs a GET URL locally (R2 caps it at 7 days). URLs go into ``/jobs``, the
manifest and webhooks; never into metrics or logs (a presigned URL is a bearer credential until it expires).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

MAX_PRESIGN_TTL_S = 7 * 24 * 3600  # R2's and S3's limit for SigV4 presigned URLs


class Urls:
    def __init__(self, *, public_base_url: str = "", presign: Callable[[str, int], str] | None = None,
                 ttl_s: int = 0) -> None:
        self.public_base_url = public_base_url.rstrip("/")
        self.presign = presign
        self.ttl_s = min(int(ttl_s), MAX_PRESIGN_TTL_S)

    @property
    def kind(self) -> str:
        if self.public_base_url:
            return "public"
        return "presigned" if self.presign is not None and self.ttl_s > 0 else "none"

    def url(self, key: str | None) -> str | None:
        if not key:
            return None
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key, safe='/~-._')}"
        if self.presign is not None and self.ttl_s > 0:
            return self.presign(key, self.ttl_s)
        return None
