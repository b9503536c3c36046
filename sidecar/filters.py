"""Which paths in the watched tree are upload candidates.

Always ignored: anything under a dot-folder or named with a leading dot (which covers ``.tmp*`` files of
safetensors and atomic writers), and common partial-download suffixes. Then the extension allow-list, the
include globs (if any) and the exclude globs decide. Globs match the ``/``-separated relative path with
:func:`fnmatch.fnmatchcase`, where ``*`` also crosses ``/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from sidecar.keys import path_text

PARTIAL_SUFFIXES = (".part", ".partial", ".crdownload", ".tmp", "~")
_RAW_PARTIAL_SUFFIXES = tuple(suffix.encode("ascii") for suffix in PARTIAL_SUFFIXES)


class PathFilter:
    """Decides whether a relative path is a candidate, and if not, why."""

    def __init__(self, extensions: Iterable[str], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self._extensions = frozenset(ext.lower().lstrip(".") for ext in extensions)
        self._raw_extensions = frozenset(ext.encode("ascii") for ext in self._extensions if ext.isascii())
        self._include = tuple(include)
        self._exclude = tuple(exclude)

    def skip_reason(self, relpath: str) -> str | None:
        """None when ``relpath`` should be uploaded; otherwise a short bounded reason label."""
        folders, _, name = relpath.rpartition("/")
        if folders and self.dir_skip_reason(folders) is not None:
            return "hidden"
        return self.name_skip_reason(name) or self.glob_skip_reason(relpath)

    def name_skip_reason(self, name: str) -> str | None:
        """The rules that look at the file name alone (for a walk that checked each folder on its way down)."""
        if name.startswith("."):
            return "hidden"
        if name.lower().endswith(PARTIAL_SUFFIXES):
            return "partial"
        ext = name.rpartition(".")[2].lower() if "." in name else ""
        if ext not in self._extensions:
            return "extension"
        return None

    def raw_name_skip_reason(self, name: bytes) -> str | None:
        """:meth:`name_skip_reason` of a file name as the directory holds it: ASCII names (nearly all) are
        judged without decoding, the same way (a walk over a million names spent a fifth of its time here)."""
        if not name.isascii():
            return self.name_skip_reason(path_text(name))
        if name[:1] == b".":
            return "hidden"
        low = name.lower()
        if low.endswith(_RAW_PARTIAL_SUFFIXES):
            return "partial"
        if (low.rpartition(b".")[2] if b"." in low else b"") not in self._raw_extensions:
            return "extension"
        return None

    @property
    def has_globs(self) -> bool:
        """True when :meth:`glob_skip_reason` can skip anything (include or exclude globs are set)."""
        return bool(self._include or self._exclude)

    def glob_skip_reason(self, relpath: str) -> str | None:
        """The include and exclude globs, on the whole relative path."""
        if self._include and not any(fnmatchcase(relpath, glob) for glob in self._include):
            return "not_included"
        if any(fnmatchcase(relpath, glob) for glob in self._exclude):
            return "excluded"
        return None

    def dir_skip_reason(self, reldir: str) -> str | None:
        """None when the scan should descend into ``reldir``."""
        if any(part.startswith(".") for part in reldir.split("/")):
            return "hidden"
        return None
