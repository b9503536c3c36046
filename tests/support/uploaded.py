"""Journal rows in the state the uploader leaves them: a file written, recorded, claimed and marked uploaded."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sidecar.journal import UPLOADED, Candidate, FileRow, Journal
from sidecar.journal_schema import version_of


def uploaded(journal: Journal, root: Path, rel: str, data: bytes, *, old: bool = True) -> FileRow:
    """Write ``rel``, record it and mark it uploaded as the uploader would (ETag = MD5, proven)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:  # older than the quiet period: no writer evidence needed beyond the lease
        os.utime(path, (1_600_000_000, 1_600_000_000))
    st = path.stat()
    journal.record([Candidate(rel.encode(), st.st_size, st.st_mtime_ns, "scan", st.st_ino, st.st_ctime_ns)])
    (row,) = journal.claim(1)
    md5 = hashlib.md5(data).hexdigest()
    journal.mark_uploaded(row, uploaded=version_of(st), md5=md5, key=f"pod/{rel}", etag=md5)
    got = journal.get(rel.encode())
    assert got is not None and got.state == UPLOADED
    return got
