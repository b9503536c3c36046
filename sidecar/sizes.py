"""Sizes as people write them in environment variables: ``5368709120``, ``5G``, ``5GiB``, ``512MB``, ``10%``.

Units are binary (``K`` = ``KiB`` = 1024 bytes; ``KB`` is accepted and means the same, as in ``df -h``).
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_bytes(text: str) -> int:
    """Bytes from ``text``; ValueError with a hint when it is not a size."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError("must be a size in bytes, optionally with a unit: 5368709120, 5G, 5GiB, 512M")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_floor(text: str) -> tuple[int | None, float | None]:
    """``(bytes, None)`` or ``(None, fraction)`` from a size or a percentage of a filesystem."""
    percent = _PERCENT.fullmatch(text.strip())
    if percent:
        value = float(percent.group(1))
        if not 0 < value < 100:
            raise ValueError("a percentage must be between 0 and 100 (exclusive)")
        return None, value / 100
    try:
        return parse_bytes(text), None
    except ValueError:
        raise ValueError("must be a size (5G, 512MiB, bytes) or a percentage of the filesystem (10%)") from None


def floor_bytes(floor: tuple[int | None, float | None], total: int) -> int:
    """The floor in bytes for a filesystem of ``total`` bytes."""
    size, fraction = floor
    return size if size is not None else int(total * (fraction or 0.0))
