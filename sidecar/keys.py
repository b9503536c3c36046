"""Object keys: built from ``SIDECAR_KEY_TEMPLATE``, checked against the store's limit.

Placeholders: ``{pod_id}``, ``{relpath}`` (``/``-separated), ``{filename}``, ``{stem}``, ``{ext}``,
``{date}`` (UTC date of the file's mtime, ``YYYY-MM-DD``), ``{md5}`` and ``{prompt_id}`` (the ComfyUI prompt
that wrote the file, or ``no-prompt``: see :mod:`sidecar.jobs`). Bytes of a path that are not
valid UTF-8, and control characters (tab, newline, ...: S3 listings are XML, which cannot carry most of them,
and servers and tools mishandle the rest; moto answers a PUT of ``a\nb`` with a bare 404), are written as
``%XX`` so every key is printable UTF-8, and so is ``%`` itself (``%25``), so no two paths share a key.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import unicodedata
from dataclasses import dataclass

from sidecar.errors import PermanentStoreError

MAX_KEY_BYTES = 1024
NO_PROMPT = "no-prompt"  # {prompt_id} of a file no ComfyUI prompt claimed within SIDECAR_PROMPT_WAIT_S
VARIANT_HASH_CHARS = 12


# Escaped as %XX: control characters, and '%' itself, so that the mapping from paths to keys is injective
# (without it, a file literally named "a%0A.png" and one named "a<newline>.png" would share a key).
_ESCAPED = {code: f"%{code:02X}" for code in (*range(0x20), 0x25, 0x7F)}


def path_text(path: bytes) -> str:
    """A relative path as text: UTF-8 where valid; ``%XX`` for each byte that is not, for control characters
    and for ``%``. Distinct paths give distinct texts."""
    try:
        return path.decode("utf-8").translate(_ESCAPED)
    except UnicodeDecodeError:
        out: list[str] = []
        for ch in path.decode("utf-8", errors="surrogateescape"):
            code = ord(ch)
            out.append(f"%{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else ch.translate(_ESCAPED))
        return "".join(out)


def escape_unsafe(text: str) -> str:
    """``text`` with backslashes and Unicode format characters (bidi overrides, zero-width joiners: category
    Cf) as ``%XX`` of their UTF-8 bytes. ``%`` is already escaped by :func:`path_text`, so this stays
    injective."""
    if text.isascii() and "\\" not in text:
        return text
    return "".join(
        "".join(f"%{b:02X}" for b in ch.encode("utf-8")) if ch == "\\" or unicodedata.category(ch) == "Cf" else ch
        for ch in text
    )


@dataclass(frozen=True, slots=True)
class KeyBuilder:
    """Formats keys for one pod from one template."""

    template: str
    pod_id: str
    escape_unsafe: bool = False  # SIDECAR_KEY_ESCAPE=unsafe

    @property
    def needs_prompt(self) -> bool:
        """The template has ``{prompt_id}``: a file waits for ComfyUI to name its prompt (sidecar.jobs)."""
        return "{prompt_id}" in self.template

    @property
    def needs_md5(self) -> bool:
        """The template has ``{md5}``: the key is known only once the whole file was hashed."""
        return "{md5}" in self.template

    def key_for(self, relpath: bytes, *, mtime_ns: int, md5: str, prompt_id: str | None = None) -> str:
        """The key this file's content is stored under, unless that key already holds other bytes.

        Raises a permanent ``InvalidObjectName`` for a key with an empty, ``.`` or ``..`` segment (a
        template that leaves a placeholder empty for this file), before any request."""
        rel = path_text(relpath)
        if self.escape_unsafe:
            rel = escape_unsafe(rel)
        filename = posixpath.basename(rel)
        stem, dot, ext = filename.rpartition(".")
        if not dot:
            stem, ext = filename, ""
        date = ""
        if "{date}" in self.template:  # strftime per file shows in the burst profile; most templates lack it
            date = dt.datetime.fromtimestamp(mtime_ns / 1e9, tz=dt.UTC).strftime("%Y-%m-%d")
        key = self.template.format(
            pod_id=self.pod_id, relpath=rel, filename=filename, stem=stem, ext=ext, date=date, md5=md5,
            prompt_id=prompt_id or NO_PROMPT,
        )
        if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
            raise PermanentStoreError(
                "the key template gives this file a key with an empty, '.' or '..' segment", operation="PutObject",
                key=key[:80], code="InvalidObjectName",
                hint="a placeholder is empty for this file (e.g. {ext} of a name without '.'); change "
                     "SIDECAR_KEY_TEMPLATE or the route's key_template",
            )
        return key

    @staticmethod
    def variant(key: str, md5: str) -> str:
        """The deterministic alternative key for different content under a taken key: ``a/b.<md5>.png``."""
        head, slash, name = key.rpartition("/")
        stem, dot, ext = name.rpartition(".")
        tag = md5[:VARIANT_HASH_CHARS]
        name = f"{stem}.{tag}.{ext}" if dot and stem else f"{name}.{tag}"
        return f"{head}{slash}{name}"


def check_key(key: str) -> None:
    """Raise a permanent InvalidObjectName error for keys the store would reject, before any request."""
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise PermanentStoreError(
            f"key is {size} bytes, over the {MAX_KEY_BYTES}-byte limit",
            operation="PutObject",
            key=key[:80] + "...",
            code="InvalidObjectName",
            hint="shorten the folder or file name, or SIDECAR_KEY_TEMPLATE",
        )
