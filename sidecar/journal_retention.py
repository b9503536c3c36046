"""The journal's side of retention: which uploaded files may go, and the one transition uploaded → deleted.

The safety checks on the file itself are :mod:`sidecar.safedelete`'s; this module only answers from the
journal ("uploaded, with a proven ETag, in this order") and records what was done.
"""

from __future__ import annotations

from sidecar.journal_db import Database
from sidecar.journal_schema import ROW_COLUMNS, SAME_VERSION, FileRow, claimed, row_of


class RetentionLedger(Database):
    """Queries and the deleted transition, on the journal database."""

    def deletable(
        self, limit: int, *, after: tuple[float, int] = (0.0, 0), before: float | None = None,
    ) -> list[tuple[FileRow, float]]:
        """Uploaded rows with a proven ETag and MD5 and their upload times, oldest upload first (``id``
        breaks ties), starting after the ``(uploaded_at, id)`` cursor ``after``; only those uploaded at or
        before ``before`` if given."""
        rows = self._read(
            f"SELECT {ROW_COLUMNS}, uploaded_at FROM files WHERE state = 'uploaded' AND etag IS NOT NULL "  # noqa: S608
            "AND md5 IS NOT NULL AND uploaded_at IS NOT NULL AND (uploaded_at, id) > (:at, :id) "
            "AND uploaded_at <= :before ORDER BY uploaded_at, id LIMIT :limit",
            {"at": after[0], "id": after[1], "limit": limit, "before": float("inf") if before is None else before},
        )
        return [(row_of(r), float(r[-1])) for r in rows]  # type: ignore[arg-type]

    def kept_bytes(self) -> int:
        """Bytes of uploaded files the journal believes are still on disk."""
        total = self._read("SELECT SUM(size) FROM files WHERE state = 'uploaded'")[0][0]
        return int(total) if isinstance(total, int | float) else 0

    def mark_deleted(self, row: FileRow, *, reason: str) -> bool:
        """``row`` (still the uploaded version it was read as) is gone from disk. False if the row moved on
        meanwhile (a new version was recorded, or it is no longer uploaded): then nothing changes."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                f"""UPDATE files SET state = 'deleted', deleted_at = :now, delete_reason = :reason,
                       updated_at = :now
                   WHERE id = :id AND state = 'uploaded' AND {SAME_VERSION}""",  # noqa: S608 - a constant
                {"now": now, "reason": reason, "id": row.id, **claimed(row.version)},
            )
            return bool(cur.rowcount)

    def deleted_summary(self) -> dict[str, tuple[int, int]]:
        """(files, bytes) of deleted rows by reason."""
        return {
            str(r[0]): (int(r[1]), int(r[2] or 0))  # type: ignore[call-overload]
            for r in self._read("SELECT delete_reason, COUNT(*), SUM(size) FROM files WHERE state = 'deleted' "
                                "GROUP BY delete_reason")
        }
