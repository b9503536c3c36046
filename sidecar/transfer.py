"""Moving one file's bytes into the store: read, hash, choose the key, write conditionally, prove it.

Every write is conditional (``If-None-Match: *``), a single PUT below the multipart threshold and the
completion of a multipart upload above it, so no key is ever overwritten. The common case is one request
per file and no HEAD: only when the key is taken (412) does a HEAD follow, to tell our own earlier
upload (the store's ETag is our MD5: done) from a different file under a reused name (store it under
its content-hash variant key, tried once; if that holds other bytes too, the file is parked).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeVar

import structlog

from sidecar.errors import KeyExistsError, PermanentStoreError, SidecarError, StoreError
from sidecar.filebody import FileSlice
from sidecar.journal import FileRow
from sidecar.journal_schema import Version, version_of
from sidecar.keys import KeyBuilder, check_key, path_text
from sidecar.localfile import open_regular, same_version
from sidecar.parts import PartBudget, read_exactly, send_parts
from sidecar.store import ObjectHeaders, ObjectStore, composite_etag

if TYPE_CHECKING:
    from sidecar.routing import Router

T = TypeVar("T")
log = structlog.get_logger("sidecar.transfer")


class Retry(Protocol):
    """Runs a store call with the in-process retry policy."""

    def __call__(self, fn: Callable[[], T], /) -> T: ...


class MultipartLedger(Protocol):
    """Where open multipart uploads are written down, so none is forgotten (the journal)."""

    def set_upload(self, row_id: int, key: str | None, upload_id: str | None) -> None: ...

    def add_orphan(self, key: str, upload_id: str) -> None: ...


MAX_PARTS = 10_000
IN_MEMORY_MAX = 8 * 1024 * 1024  # single PUTs up to this size are read once into memory; larger ones stream
PROMPT_METADATA = "prompt-id"  # x-amz-meta-prompt-id
MIB = 1024 * 1024


class FileChanged(SidecarError):
    """The file changed while it was being read; it will be read again once it settles."""


class AwaitingPrompt(SidecarError):
    """The key needs ``{prompt_id}`` and ComfyUI has not named this file's prompt yet: try again later."""

    def __init__(self, left_s: float) -> None:
        super().__init__(f"waiting up to {left_s:.1f} s more for ComfyUI to name the prompt")
        self.left_s = left_s


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
    version: Version = (0, 0, 0, 0)  # (size, mtime, inode, ctime) of the version read


def _is_confirmed(row: FileRow, st: os.stat_result) -> bool:
    """The file opened is the version the journal recorded as finished (unknown parts of it match all)."""
    if row.size == 0 and row.mtime_ns == 0:
        return True  # a row without a recorded version (tests, hand-made rows)
    if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
        return False
    return row.ino == 0 or (st.st_ino, st.st_ctime_ns) == (row.ino, row.ctime_ns)  # 0: journal of schema 1


def part_size_for(size: int, minimum: int) -> int:
    """Equal part size (whole MiB, at least ``minimum``) so that ``size`` needs at most 10,000 parts."""
    needed = math.ceil(size / MAX_PARTS)
    return max(minimum, math.ceil(needed / MIB) * MIB)


@dataclass(frozen=True, slots=True)
class _Content:
    """What was read: the whole-file MD5, and for multipart the MD5 of each part."""

    md5: str  # "" for a multipart upload whose hash comes with its one pass (:func:`send_parts`)
    st: os.stat_result
    data: bytearray = field(default_factory=bytearray)
    streamed: bool = False  # a single PUT sent from the descriptor, not from ``data``
    part_size: int = 0
    part_md5s: tuple[str, ...] = ()


class Transfer:
    """Uploads one journal row's file; raises StoreError, SourceFileError or FileChanged on failure."""

    def __init__(
        self,
        store: ObjectStore,
        root: Path,
        router: Router,
        *,
        multipart_threshold: int,
        part_size: int,
        retry: Retry,
        ledger: MultipartLedger,
        budget: PartBudget | None = None,
        on_progress: Callable[[int, int], None] = lambda done, total: None,
        prompt_wait_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._prompt_wait_s = prompt_wait_s
        self._clock = clock
        self._store = store
        self._root = root
        self._router = router
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._retry = retry
        self._ledger = ledger
        self._budget = budget or PartBudget(2, 1)
        self._on_progress = on_progress

    def run(self, row: FileRow) -> Result:
        route = self._router.route(row.path)
        if route.keys.needs_prompt and row.prompt_id is None:
            left = row.discovered_at + self._prompt_wait_s - self._clock()
            if left > 0:
                raise AwaitingPrompt(left)
        fd, st = open_regular(self._root, row.path)
        with os.fdopen(fd, "rb") as f:
            if not _is_confirmed(row, st):
                # Not the version the writer check confirmed: a writer may be at work on it right now (it was
                # rewritten after the check). Its own events, or the next scan, record the new version.
                raise FileChanged(path_text(row.path))
            md5_first = row.etag is not None or route.keys.needs_md5
            content = self._read(row, f, st, md5_first=md5_first)
            if row.etag is not None and row.key and row.md5 == content.md5:
                return self._result(row.key, row.etag, content, "unchanged")
            base = route.keys.key_for(row.path, mtime_ns=st.st_mtime_ns, md5=content.md5, prompt_id=row.prompt_id)
            headers = route.headers(path_text(row.path))
            if row.prompt_id:  # known at upload time: the object says which prompt wrote it
                headers = replace(headers, metadata=(*headers.metadata, (PROMPT_METADATA, row.prompt_id)))
            check_key(base)
            # Known new content under a name we uploaded before goes to its variant at once.
            key = KeyBuilder.variant(base, content.md5) if row.etag is not None and row.md5 != content.md5 else base
            box = [content]
            while True:
                check_key(key)
                try:
                    etag = self._write(row, f, key, box, headers)
                except KeyExistsError:
                    existing = self._ours(key, box[0])
                    if existing is not None:
                        return existing
                    if key != base:
                        break
                    key = KeyBuilder.variant(base, box[0].md5)  # the md5 is known once the bytes were read
                    continue
                return self._result(key, etag, box[0], "uploaded", base if key != base else "")
        raise PermanentStoreError(
            "the key and its content-hash variant both hold other bytes", operation="PutObject",
            key=key, code="KeyConflict",
            hint="another writer uses this prefix; change SIDECAR_KEY_TEMPLATE",
        )

    @staticmethod
    def _result(key: str, etag: str, c: _Content, outcome: str, variant_of: str = "") -> Result:
        return Result(key, etag, c.md5, c.st.st_size, c.st.st_mtime_ns, outcome, variant_of, version_of(c.st))

    def _ours(self, key: str, content: _Content) -> Result | None:
        """The key exists: if it holds our bytes already (a crash after the write), we are done.

        The store's ETag proves it. Where it does not but our metadata claims the object (a store whose ETag
        is not the MD5, or a wrong one), the bytes themselves decide: one GET, only on this rare path.
        """
        info = self._retry(lambda: self._store.head(key))
        if info is None or info.size != content.st.st_size:
            log.info("key_taken", key=key, found="nothing" if info is None else f"{info.size} bytes")
            return None
        if info.md5 == content.md5 or (content.part_md5s and info.etag == composite_etag(list(content.part_md5s))):
            return self._result(key, info.etag, content, "existing")
        if info.claimed_md5 == content.md5:
            read = self._retry(lambda: self._store.read_md5(key))
            log.warning("store_etag_disagrees", key=key, etag=info.etag, bytes_md5=read, ours=content.md5)
            if read == content.md5:
                return self._result(key, info.etag, content, "existing")
        return None

    # -- reading --------------------------------------------------------------------------------------

    def _read(self, row: FileRow, f: BinaryIO, st: os.stat_result, *, md5_first: bool) -> _Content:
        """Hash the file (single PUTs; multipart only when the MD5 is needed before the first part).

        Small files are held in memory for their one PUT; larger single PUTs are hashed in 1 MiB reads and
        later streamed from the descriptor, so a worker holds at most 1 MiB of them.
        """
        multipart = st.st_size > self._threshold
        if not multipart and st.st_size <= IN_MEMORY_MAX:
            data = read_exactly(f.fileno(), st.st_size, 0)
            if len(data) != st.st_size or not same_version(st, os.fstat(f.fileno())):
                raise FileChanged(path_text(row.path))
            return _Content(hashlib.md5(data, usedforsecurity=False).hexdigest(), st, data=data)
        if multipart and not md5_first:
            return _Content("", st, part_size=part_size_for(st.st_size, self._part_size))
        chunk_size = part_size_for(st.st_size, self._part_size) if multipart else MIB
        whole, parts, total = hashlib.md5(usedforsecurity=False), [], 0
        fd = f.fileno()
        while chunk := os.pread(fd, chunk_size, total):
            whole.update(chunk)
            if multipart:
                parts.append(hashlib.md5(chunk, usedforsecurity=False).hexdigest())
            total += len(chunk)
            if total >= st.st_size:
                break
        if total != st.st_size or not same_version(st, os.fstat(fd)):
            raise FileChanged(path_text(row.path))
        return _Content(whole.hexdigest(), st, streamed=True, part_size=chunk_size if multipart else 0,
                        part_md5s=tuple(parts))

    # -- writing --------------------------------------------------------------------------------------

    def _write(self, row: FileRow, f: BinaryIO, key: str, box: list[_Content], headers: ObjectHeaders) -> str:
        """Write ``key``; ``box[0]`` is what is known of the content, completed by a multipart pass."""
        content = box[0]
        if not content.part_size:
            size = content.st.st_size

            def body() -> bytearray | FileSlice:
                return FileSlice(f.fileno(), size) if content.streamed else content.data

            return self._retry(lambda: self._store.put(key, body(), md5_hex=content.md5, headers=headers))
        md5 = content.md5 or None
        upload_id = self._retry(lambda: self._store.create_multipart(key, md5_hex=md5, headers=headers))
        self._ledger.set_upload(row.id, key, upload_id)
        try:
            box[0] = content = self._send_parts(row, f, key, upload_id, content)
            etag = self._complete(key, upload_id, list(content.part_md5s), content)
        except BaseException:
            self._abort(row.id, key, upload_id)
            raise
        self._ledger.set_upload(row.id, None, None)
        return etag

    def _send_parts(self, row: FileRow, f: BinaryIO, key: str, upload_id: str, content: _Content) -> _Content:
        """One pass over the file: parts go out in parallel while the whole file is hashed."""
        total = content.st.st_size

        def upload(number: int, data: bytearray) -> str:
            return self._retry(lambda: self._store.upload_part(key, upload_id, number, data))

        try:
            sent = send_parts(f.fileno(), total, content.part_size, upload, self._budget,
                              on_progress=lambda done: self._on_progress(done, total),
                              expected_md5s=content.part_md5s)
        except ValueError:
            raise FileChanged(path_text(row.path)) from None  # the bytes differ from those hashed before
        if sent.total != total or not same_version(content.st, os.fstat(f.fileno())):
            raise FileChanged(path_text(row.path))
        if content.md5 and sent.md5 != content.md5:
            raise FileChanged(path_text(row.path))
        return replace(content, md5=sent.md5, part_md5s=tuple(sent.etags))

    def _complete(self, key: str, upload_id: str, etags: list[str], content: _Content) -> str:
        try:
            return self._retry(lambda: self._store.complete_multipart(key, upload_id, etags, whole_md5=content.md5))
        except PermanentStoreError as exc:
            # A completion retried after its answer was lost finds the upload gone: it may have succeeded.
            if exc.code != "NoSuchUpload":
                raise
            existing = self._ours(key, content)
            if existing is None:
                raise
            return existing.etag

    def _abort(self, row_id: int, key: str, upload_id: str) -> None:
        """Free the parts now; if the store does not answer, the journal keeps the id until an abort works."""
        try:
            self._store.abort_multipart(key, upload_id)
        except StoreError:
            self._ledger.add_orphan(key, upload_id)
        self._ledger.set_upload(row_id, None, None)
