"""The object-store boundary: the only interface the uploader knows. ``store_s3`` implements it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MD5_METADATA = "md5"  # user metadata key holding the hex MD5 of the whole content (multipart ETags are not MD5s)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD tells about an existing object."""

    key: str
    size: int
    etag: str
    md5: str | None  # from our metadata, or the ETag of a single-part upload


class ObjectStore(Protocol):
    """Writes objects without ever silently overwriting one. Every method raises ``StoreError`` subclasses."""

    def put(self, key: str, data: bytes, *, md5_hex: str, content_type: str) -> str:
        """Create ``key`` with ``data`` unless it exists (``KeyExistsError``); return the verified ETag."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Describe ``key``, or None if it does not exist."""
        ...

    def create_multipart(self, key: str, *, md5_hex: str, content_type: str) -> str:
        """Start a multipart upload; return its upload id."""
        ...

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """Upload one part (with its Content-MD5); return its ETag."""
        ...

    def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> str:
        """Finish a multipart upload; return the object's ETag."""
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abandon a multipart upload and free its parts (missing uploads are fine)."""
        ...

    def check(self) -> str:
        """One cheap request proving the bucket is reachable with these credentials; a line for humans."""
        ...
