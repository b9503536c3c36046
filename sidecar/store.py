"""The object-store boundary: the only interface the uploader knows. ``store_s3`` implements it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.filebody import FileSlice

Body = bytes | bytearray | FileSlice
MD5_METADATA = "md5"  # user metadata key holding the hex MD5 of the whole content (multipart ETags are not MD5s)


_MD5_RE = re.compile(r"[0-9a-f]{32}")


def is_md5(etag: str) -> bool:
    """True for a single-part ETag (the MD5 of the object's bytes), False for a multipart or odd one."""
    return _MD5_RE.fullmatch(etag) is not None


def composite_etag(part_md5s: list[str]) -> str:
    """The ETag S3 and R2 give a multipart object: MD5 of the parts' binary MD5s, a dash, the part count."""
    joined = b"".join(bytes.fromhex(m) for m in part_md5s)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_md5s)}"


@dataclass(frozen=True, slots=True)
class ObjectHeaders:
    """What an object is stored with besides its bytes: the same on a PutObject and a multipart upload.

    Empty strings are never sent (R2 answers an empty ``x-amz-storage-class`` with 501). ``metadata`` is the
    configured static user metadata; the sidecar's own ``md5`` entry is added on top.
    """

    content_type: str = "application/octet-stream"
    cache_control: str = ""
    content_disposition: str = ""
    storage_class: str = ""
    metadata: tuple[tuple[str, str], ...] = ()

    def _optional(self) -> list[tuple[str, str, str]]:
        """(boto3 parameter, HTTP header, value) of each optional header that is set: one table for both forms."""
        table = (("CacheControl", "Cache-Control", self.cache_control),
                 ("ContentDisposition", "Content-Disposition", self.content_disposition),
                 ("StorageClass", "x-amz-storage-class", self.storage_class))
        return [row for row in table if row[2]]

    def _metadata(self, md5_hex: str | None) -> dict[str, str]:
        return {**dict(self.metadata), MD5_METADATA: md5_hex} if md5_hex else dict(self.metadata)

    def s3_args(self, md5_hex: str | None) -> dict[str, Any]:
        """boto3 parameters of PutObject / CreateMultipartUpload for these headers (``md5`` if known)."""
        args: dict[str, Any] = {"ContentType": self.content_type, "Metadata": self._metadata(md5_hex)}
        args.update((param, value) for param, _, value in self._optional())
        return args

    def http_headers(self, md5_hex: str | None) -> list[tuple[str, str]]:
        """The same as :meth:`s3_args`, as the HTTP headers of a PutObject."""
        return [("Content-Type", self.content_type), *((header, value) for _, header, value in self._optional()),
                *((f"x-amz-meta-{name}", value) for name, value in self._metadata(md5_hex).items())]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD tells about an existing object."""

    key: str
    size: int
    etag: str
    md5: str | None  # the ETag of a single-part object; for a multipart one, our metadata
    claimed_md5: str | None = None  # what our metadata says, whatever the ETag (proof needs the bytes)


class ObjectStore(Protocol):
    """Writes objects without ever silently overwriting one. Every method raises ``StoreError`` subclasses."""

    def put(self, key: str, data: Body, *, md5_hex: str, headers: ObjectHeaders) -> str:
        """Create ``key`` with ``data`` unless it exists (``KeyExistsError``); return the ETag, proven to be
        ``md5_hex`` (an answer without it raises a transient error: nothing is assumed stored). ``data`` is
        bytes or a :class:`~sidecar.filebody.FileSlice` streamed from the file."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Describe ``key``, or None if it does not exist."""
        ...

    def read_md5(self, key: str) -> str | None:
        """The MD5 of the object's bytes, read back (a GET), or None if it does not exist."""
        ...

    def create_multipart(self, key: str, *, md5_hex: str | None, headers: ObjectHeaders) -> str:
        """Start a multipart upload; return its upload id. ``md5_hex`` (the ``md5`` metadata) is None when
        the parts are sent while the file is hashed (the whole-file MD5 is known only at the end)."""
        ...

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        """Upload one part (with its Content-MD5); return its ETag, proven to be the part's MD5."""
        ...

    def complete_multipart(self, key: str, upload_id: str, etags: list[str], *, whole_md5: str = "") -> str:
        """Finish a multipart upload unless the key exists (``KeyExistsError``); return the object's ETag,
        proven to be :func:`composite_etag` of the parts -- or ``whole_md5``, the MD5 of all the bytes, which
        some S3-compatible servers answer instead and which proves as much."""
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abandon a multipart upload and free its parts (missing uploads are fine)."""
        ...

    def check(self) -> str:
        """One cheap request proving the bucket is reachable with these credentials; a line for humans."""
        ...
