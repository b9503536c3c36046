"""Moving one file's bytes into the store: read, hash, choose the key, PUT (or multipart), verify.

Exactly one request per file below the multipart threshold: a conditional PUT with Content-MD5 whose
ETag is checked against the local MD5. Only when the key is taken (412) does a HEAD follow, to tell our
own earlier upload (same MD5: done) from a different file under a reused name (store under a variant key).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from sidecar.errors import KeyExistsError, PermanentStoreError, SidecarError
from sidecar.journal import FileRow
from sidecar.keys import KeyBuilder, check_key, path_text
from sidecar.localfile import open_regular, same_version
from sidecar.mime import content_type
from sidecar.store import ObjectStore

T = TypeVar("T")


class Retry(Protocol):
    """Runs a store call with the in-process retry policy."""

    def __call__(self, fn: Callable[[], T], /) -> T: ...


MAX_PARTS = 10_000
MIB = 1024 * 1024
HASH_CHUNK = 8 * MIB


class FileChanged(SidecarError):
    """The file changed while it was being read; it will be read again once it settles."""


@dataclass(frozen=True, slots=True)
class Result:
    """A file's content is in the bucket. ``outcome``: uploaded, existing (already there) or unchanged."""

    key: str
    etag: str
    md5: str
    size: int
    mtime_ns: int
    outcome: str
    variant_of: str = ""


def part_size_for(size: int, minimum: int) -> int:
    """Equal part size (whole MiB, at least ``minimum``) so that ``size`` needs at most 10,000 parts."""
    needed = math.ceil(size / MAX_PARTS)
    return max(minimum, math.ceil(needed / MIB) * MIB)


class Transfer:
    """Uploads one journal row's file; raises StoreError, SourceFileError or FileChanged on failure."""

    def __init__(
        self,
        store: ObjectStore,
        root: Path,
        keys: KeyBuilder,
        *,
        multipart_threshold: int,
        part_size: int,
        retry: Retry,
        on_multipart: Callable[[int, str | None, str | None], None],
        on_progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> None:
        self._store = store
        self._root = root
        self._keys = keys
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._retry = retry
        self._on_multipart = on_multipart
        self._on_progress = on_progress

    def run(self, row: FileRow) -> Result:
        fd, st = open_regular(self._root, row.path)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > self._threshold:
                return self._multipart(row, f, st)
            data = f.read()
            if len(data) != st.st_size or not same_version(st, os.fstat(f.fileno())):
                raise FileChanged(path_text(row.path))
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        unchanged = self._unchanged(row, md5, st)
        if unchanged:
            return unchanged
        base, key = self._first_key(row, md5, st)
        ctype = content_type(path_text(row.path))
        try:
            etag = self._retry(lambda: self._store.put(key, data, md5_hex=md5, content_type=ctype))
            return Result(key, etag, md5, st.st_size, st.st_mtime_ns, "uploaded", self._variant_of(base, key))
        except KeyExistsError:
            pass
        existing = self._settle_taken_key(key, md5, st)
        if existing:
            return existing
        variant = KeyBuilder.variant(base, md5)
        check_key(variant)
        try:
            etag = self._retry(lambda: self._store.put(variant, data, md5_hex=md5, content_type=ctype))
        except KeyExistsError:
            existing = self._settle_taken_key(variant, md5, st)
            if existing:
                return existing
            raise self._conflict(variant) from None
        return Result(variant, etag, md5, st.st_size, st.st_mtime_ns, "uploaded", base)

    # -- keys -----------------------------------------------------------------------------------------

    @staticmethod
    def _unchanged(row: FileRow, md5: str, st: os.stat_result) -> Result | None:
        if row.etag is not None and row.key and row.md5 == md5:
            return Result(row.key, row.etag, md5, st.st_size, st.st_mtime_ns, "unchanged")
        return None

    def _first_key(self, row: FileRow, md5: str, st: os.stat_result) -> tuple[str, str]:
        """(base key, key to try first). Known new content under an uploaded name goes to its variant at once."""
        base = self._keys.key_for(row.path, mtime_ns=st.st_mtime_ns, md5=md5)
        check_key(base)
        if row.etag is not None and row.md5 != md5:
            variant = KeyBuilder.variant(base, md5)
            check_key(variant)
            return base, variant
        return base, base

    @staticmethod
    def _variant_of(base: str, key: str) -> str:
        return base if key != base else ""

    def _settle_taken_key(self, key: str, md5: str, st: os.stat_result) -> Result | None:
        """The key exists: if it holds our bytes already (a crash after the PUT), we are done."""
        info = self._retry(lambda: self._store.head(key))
        if info is not None and info.md5 == md5:
            return Result(key, info.etag, md5, st.st_size, st.st_mtime_ns, "existing")
        return None

    @staticmethod
    def _conflict(key: str) -> PermanentStoreError:
        return PermanentStoreError(
            "the key and its content-hash variant both hold other bytes", operation="PutObject", key=key,
            code="KeyConflict", hint="another writer uses this prefix; change SIDECAR_KEY_TEMPLATE",
        )

    # -- multipart ------------------------------------------------------------------------------------

    def _multipart(self, row: FileRow, f: BinaryIO, st: os.stat_result) -> Result:
        md5 = self._hash(f, st, row)
        unchanged = self._unchanged(row, md5, st)
        if unchanged:
            return unchanged
        base, key = self._first_key(row, md5, st)
        # Multipart has no conditional create everywhere, so look before writing (a HEAD is Class B on R2).
        for candidate in (key, KeyBuilder.variant(base, md5)):
            info = self._retry(lambda k=candidate: self._store.head(k))  # type: ignore[misc]
            if info is None:
                key = candidate
                break
            if info.md5 == md5:
                return Result(candidate, info.etag, md5, st.st_size, st.st_mtime_ns, "existing")
        else:
            raise self._conflict(key)
        check_key(key)
        etag = self._send_parts(row, f, st, key, md5)
        return Result(key, etag, md5, st.st_size, st.st_mtime_ns, "uploaded", self._variant_of(base, key))

    def _hash(self, f: BinaryIO, st: os.stat_result, row: FileRow) -> str:
        digest = hashlib.md5(usedforsecurity=False)
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
        if not same_version(st, os.fstat(f.fileno())):
            raise FileChanged(path_text(row.path))
        return digest.hexdigest()

    def _send_parts(self, row: FileRow, f: BinaryIO, st: os.stat_result, key: str, md5: str) -> str:
        ctype = content_type(path_text(row.path))
        upload_id = self._retry(lambda: self._store.create_multipart(key, md5_hex=md5, content_type=ctype))
        self._on_multipart(row.id, key, upload_id)
        size = part_size_for(st.st_size, self._part_size)
        etags: list[str] = []
        try:
            for number, offset in enumerate(range(0, st.st_size, size), start=1):
                f.seek(offset)
                data = f.read(size)
                etags.append(self._retry(lambda d=data, n=number: self._store.upload_part(key, upload_id, n, d)))  # type: ignore[misc]
                self._on_progress(offset + len(data), st.st_size)
            if not same_version(st, os.fstat(f.fileno())):
                raise FileChanged(path_text(row.path))
            etag = self._retry(lambda: self._store.complete_multipart(key, upload_id, etags))
        except BaseException:
            try:
                self._store.abort_multipart(key, upload_id)
                self._on_multipart(row.id, None, None)
            except SidecarError:
                pass  # the journal still names it; the next start aborts it
            raise
        return etag
