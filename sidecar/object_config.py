"""Checks of the settings that shape stored objects: key templates, headers, storage class, metadata, routes.

Each function raises ValueError with a message meant to follow the variable's name; :mod:`sidecar.config`
calls them from its validators, so a bad value is one line and exit 2 before anything starts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

KEY_FIELDS = ("pod_id", "relpath", "filename", "stem", "ext", "date", "md5", "prompt_id")
SAMPLE = {"pod_id": "pod", "relpath": "day/ComfyUI_00001_.png", "filename": "ComfyUI_00001_.png",
          "stem": "ComfyUI_00001_", "ext": "png", "date": "2026-12-01", "md5": "0" * 32,
          "prompt_id": "0f6e1b2a-prompt"}
R2_STORAGE_CLASSES = ("STANDARD", "STANDARD_IA")
S3_STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
                      "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "OUTPOSTS", "EXPRESS_ONEZONE", "SNOW")
R2_METADATA_BYTES = 8192  # R2's limit on all user metadata of an object
S3_METADATA_BYTES = 2048  # S3's
RESERVED_METADATA = frozenset({"md5", "prompt-id"})  # the sidecar's own entries
_META_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")  # printable US-ASCII: what every S3 server takes in a header


def check_template(value: str) -> str:
    """A key template: known placeholders, one that makes keys unique, no empty/./.. segment, no leading /."""
    try:
        sample = value.format(**SAMPLE)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"unknown or malformed placeholder {exc}; allowed: {', '.join('{' + f + '}' for f in KEY_FIELDS)}"
        ) from None
    if "{relpath}" not in value and "{filename}" not in value and "{md5}" not in value:
        raise ValueError("must contain {relpath}, {filename} or {md5}, or every file gets the same key")
    check_key_shape(sample, "gives keys")
    return value


def check_key_shape(key: str, what: str = "key") -> None:
    if key.startswith("/"):
        raise ValueError(f"{what} starting with '/' (S3 keys have no leading slash): remove it")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"{what} with an empty, '.' or '..' segment (like 'a//b' or 'a/../b')")


def check_pod_id(value: str) -> str:
    printable = _HEADER_VALUE.fullmatch(value) is not None and value.strip() == value
    if not value or "/" in value or value in (".", "..") or not printable:
        raise ValueError("must be one key segment: not empty, no '/', not '.' or '..', printable ASCII")
    return value


def check_header(value: str) -> str:
    if not _HEADER_VALUE.fullmatch(value) or value != value.strip():
        raise ValueError("must be printable ASCII without leading or trailing spaces (it is sent as a header)")
    return value


def check_disposition(value: str) -> str:
    if value in ("auto", "none"):
        return value
    check_header(value)
    if value.split(";", 1)[0].strip().lower() not in ("inline", "attachment"):
        raise ValueError("must be auto, none, or a Content-Disposition starting with inline or attachment")
    return value


# Setting types that run these checks (pydantic applies them after parsing, also inside SIDECAR_ROUTES).
KeyTemplate = Annotated[str, AfterValidator(check_template)]
PodId = Annotated[str, AfterValidator(check_pod_id)]
HeaderValue = Annotated[str, AfterValidator(check_header)]
Disposition = Annotated[str, AfterValidator(check_disposition)]


def parse_metadata(items: list[str] | dict[str, str]) -> dict[str, str]:
    """``key=value`` items (or a mapping) as user metadata; keys lower case (R2 and S3 fold them)."""
    pairs = items.items() if isinstance(items, dict) else (_split_pair(item) for item in items)
    out: dict[str, str] = {}
    for key, value in pairs:
        name = key.strip().lower()
        if not _META_KEY.fullmatch(name):
            raise ValueError(f"metadata name {key!r}: letters, digits, '-' and '_' only (an HTTP header name)")
        if name in RESERVED_METADATA:
            raise ValueError(f"metadata name {name!r} is the sidecar's own (the content's MD5)")
        out[name] = check_header(value)
    return out


def _split_pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"{item!r} is not key=value")
    return key, value


def metadata_bytes(metadata: dict[str, str]) -> int:
    """Bytes the store counts: names and values, the sidecar's md5 entry included."""
    return sum(len(k) + len(v) for k, v in metadata.items()) + len("md5") + 32


def check_storage_class(value: str, *, r2: bool) -> str:
    allowed = R2_STORAGE_CLASSES if r2 else S3_STORAGE_CLASSES
    if value and value not in allowed:
        raise ValueError(f"{value!r} is not a storage class {'R2' if r2 else 'S3'} accepts: {', '.join(allowed)}")
    return value


class RouteSpec(BaseModel):
    """One entry of ``SIDECAR_ROUTES``: files whose relative path matches ``match`` (a glob, ``*`` crosses
    ``/``) get this key template and these headers; unset fields take the global settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(min_length=1)
    key_template: str | None = None
    cache_control: str | None = None
    content_disposition: str | None = None
    storage_class: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    def model_post_init(self, _context: Any) -> None:
        if self.key_template is not None:
            check_template(self.key_template)
        if self.cache_control is not None:
            check_header(self.cache_control)
        if self.content_disposition is not None:
            check_disposition(self.content_disposition)
        parse_metadata(self.metadata)


def check_objects(settings: Any, *, r2: bool) -> None:
    """Storage class and metadata size of the global settings and of every route, against the store."""
    limit = R2_METADATA_BYTES if r2 else S3_METADATA_BYTES
    rules: list[tuple[str, RouteSpec | None]] = [("SIDECAR_STORAGE_CLASS", None)]
    rules += [(f"SIDECAR_ROUTES[{n}]", rule) for n, rule in enumerate(settings.routes)]
    for name, rule in rules:
        storage = settings.storage_class if rule is None or rule.storage_class is None else rule.storage_class
        meta = {**settings.metadata, **(rule.metadata if rule is not None else {})}
        try:
            check_storage_class(storage, r2=r2)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if metadata_bytes(meta) > limit:
            which = "SIDECAR_METADATA" if rule is None else name
            raise ValueError(f"{which}: metadata of {metadata_bytes(meta)} bytes is over the store's {limit}-byte "
                             "limit (names and values, the sidecar's md5 entry included)")
