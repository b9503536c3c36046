"""Fill a daemon journal with a tree's files as already uploaded, through the journal's own API.

    PYTHONPATH=. python bench/fill_journal.py --tree DIR --journal STATE/journal.sqlite3 [--key-template ...]

Uploading a million files to fill a journal would take the bench half an hour; what a restart meets is a
journal in which every file is ``uploaded`` with its version, MD5, key and ETag. So every file is stat'ed
and passed to ``Journal.record`` (in batches), claimed with ``Journal.claim`` and marked with
``Journal.mark_uploaded``, exactly the calls the daemon makes; the MD5 is computed from the bytes. The
bucket stays empty: a restart that sent any request for these files would show up in the server's log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from sidecar.journal import Candidate, open_journal
from sidecar.journal_schema import version_of

BATCH = 5000


def walk(tree: Path) -> list[tuple[bytes, os.stat_result, str]]:
    out = []
    root = os.fsencode(tree)
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                md5 = hashlib.md5(f.read()).hexdigest()
            out.append((os.path.relpath(path, root), os.lstat(path), md5))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", type=Path, required=True)
    p.add_argument("--journal", type=Path, required=True)
    a = p.parse_args()
    t0 = time.monotonic()
    files = walk(a.tree)
    a.journal.parent.mkdir(parents=True, exist_ok=True)
    journal, _ = open_journal(a.journal)
    by_path = {rel: (st, md5) for rel, st, md5 in files}
    for start in range(0, len(files), BATCH):
        batch = files[start : start + BATCH]
        journal.record(Candidate(rel, st.st_size, st.st_mtime_ns, "scan", st.st_ino, st.st_ctime_ns)
                       for rel, st, _ in batch)
        for row in journal.claim(BATCH):
            st, md5 = by_path[row.path]
            journal.mark_uploaded(row, uploaded=version_of(st), md5=md5, key=os.fsdecode(row.path), etag=md5)
    journal.close()
    print(f"filled {len(files)} rows in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
