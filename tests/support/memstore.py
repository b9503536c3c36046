"""An in-memory :class:`~sidecar.store.ObjectStore` with a fault knob, for fast uploader and transfer tests.

It keeps the contract the S3 store keeps (``tests/test_store_contract.py`` runs the same tests against
both): conditional writes refuse a taken key, ETags are MD5s (composite for multipart), HEAD reports the
store's own MD5 for single-part objects. ``fail`` makes the next matching calls raise what a real store's
failure would be classified as; ``no_etag`` makes the next writes answer without an ETag.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field

from sidecar.errors import KeyExistsError, PermanentStoreError, StoreError, TransientStoreError
from sidecar.store import Body, ObjectHeaders, ObjectInfo, composite_etag


@dataclass
class _Upload:
    key: str
    md5_hex: str | None
    parts: dict[int, bytes] = field(default_factory=dict)


class MemoryStore:
    """ObjectStore in a dict. Thread-safe. ``calls`` lists (operation, key) of every call."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self._etags: dict[str, str] = {}  # of multipart objects (single-part ETags are the MD5)
        self.calls: list[tuple[str, str]] = []
        self._uploads: dict[str, _Upload] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._faults: list[tuple[str, int, StoreError]] = []
        self._no_etag = 0

    # -- the fault knob ------------------------------------------------------------------------------

    def fail(self, operation: str, exc: StoreError, times: int = 1) -> None:
        """The next ``times`` calls of ``operation`` ('*' for any) raise ``exc``."""
        with self._lock:
            self._faults.append((operation, times, exc))

    def no_etag(self, times: int = 1) -> None:
        """The next ``times`` writes keep the bytes but answer without an ETag."""
        with self._lock:
            self._no_etag += times

    def _enter(self, operation: str, key: str) -> bool:
        """Record the call; raise an injected fault; True if this answer must lack its ETag."""
        with self._lock:
            self.calls.append((operation, key))
            for n, (op, times, exc) in enumerate(self._faults):
                if op in (operation, "*"):
                    if times <= 1:
                        del self._faults[n]
                    else:
                        self._faults[n] = (op, times - 1, exc)
                    raise exc
            if operation in ("PutObject", "CompleteMultipartUpload") and self._no_etag:
                self._no_etag -= 1
                return True
        return False

    # -- ObjectStore ---------------------------------------------------------------------------------

    def put(self, key: str, data: Body, *, md5_hex: str, headers: ObjectHeaders) -> str:
        lie = self._enter("PutObject", key)
        data = bytes(data) if isinstance(data, bytes | bytearray) else data.read()
        if hashlib.md5(data).hexdigest() != md5_hex:
            raise TransientStoreError("BadDigest (400)", operation="PutObject", key=key, code="BadDigest")
        with self._lock:
            if key in self.objects:
                raise KeyExistsError("PreconditionFailed (412)", operation="PutObject", key=key,
                                     code="PreconditionFailed")
            self.objects[key] = data
            self.metadata[key] = {"md5": md5_hex}
        if lie:
            raise _no_etag("PutObject", key)
        return md5_hex

    def head(self, key: str) -> ObjectInfo | None:
        self._enter("HeadObject", key)
        with self._lock:
            data = self.objects.get(key)
            if data is None:
                return None
            etag = self._etags.get(key) or hashlib.md5(data).hexdigest()
            claimed = self.metadata.get(key, {}).get("md5")
            md5 = etag if "-" not in etag else claimed
        return ObjectInfo(key=key, size=len(data), etag=etag, md5=md5, claimed_md5=claimed)

    def read_md5(self, key: str) -> str | None:
        self._enter("GetObject", key)
        with self._lock:
            data = self.objects.get(key)
        return None if data is None else hashlib.md5(data).hexdigest()

    def create_multipart(self, key: str, *, md5_hex: str | None, headers: ObjectHeaders) -> str:
        self._enter("CreateMultipartUpload", key)
        with self._lock:
            upload_id = f"upload-{next(self._ids)}"
            self._uploads[upload_id] = _Upload(key, md5_hex)
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        self._enter("UploadPart", key)
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                raise PermanentStoreError("NoSuchUpload (404)", operation="UploadPart", key=key, code="NoSuchUpload")
            upload.parts[number] = bytes(data)
        return hashlib.md5(data).hexdigest()

    def complete_multipart(self, key: str, upload_id: str, etags: list[str], *, whole_md5: str = "") -> str:
        lie = self._enter("CompleteMultipartUpload", key)
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                raise PermanentStoreError("NoSuchUpload (404)", operation="CompleteMultipartUpload", key=key,
                                          code="NoSuchUpload")
            if key in self.objects:
                raise KeyExistsError("PreconditionFailed (412)", operation="CompleteMultipartUpload", key=key,
                                     code="PreconditionFailed")
            parts = [upload.parts[n] for n in sorted(upload.parts)]
            etag = composite_etag([hashlib.md5(p).hexdigest() for p in parts])
            del self._uploads[upload_id]
            self.objects[key] = b"".join(parts)
            self.metadata[key] = {"md5": upload.md5_hex} if upload.md5_hex else {}
            self._etags[key] = etag
        if lie:
            raise _no_etag("CompleteMultipartUpload", key)
        return etag

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._enter("AbortMultipartUpload", key)
        with self._lock:
            self._uploads.pop(upload_id, None)

    def check(self) -> str:
        self._enter("HeadBucket", "")
        return "memory store reachable"

    def open_uploads(self) -> list[str]:
        with self._lock:
            return sorted(self._uploads)


def _no_etag(operation: str, key: str) -> TransientStoreError:
    """What the S3 store raises for a 200 without an ETag (the bytes may or may not be kept)."""
    return TransientStoreError("the store answered with no ETag", operation=operation, key=key, code="ETagMissing")
