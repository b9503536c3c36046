"""A request body read straight from a file descriptor: bounded, seekable, no copy of the file in memory.

botocore sends a file-like body in blocks and seeks it back to compute a payload hash or to retry, so
the body must report its length, seek and tell. :class:`FileSlice` reads with ``pread`` (no shared file
offset: a slice never disturbs another reader of the same descriptor) and never yields more than the
``size`` bytes that were hashed, even if the file grew since: the store sees exactly the version whose
Content-MD5 goes with the request, or refuses it (BadDigest) when the bytes changed meanwhile.
"""

from __future__ import annotations

import io
import os


class FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + size)`` of an open descriptor as a read-only, seekable stream."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        super().__init__()
        self._fd = fd
        self._size = size
        self._offset = offset
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._size - self._pos

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + offset), self._size)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._size - self._pos
        want = left if size is None or size < 0 else min(size, left)
        if want <= 0:
            return b""
        data = os.pread(self._fd, want, self._offset + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:  # the descriptor belongs to the caller
        super().close()
