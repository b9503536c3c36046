"""Addresses in the configuration: the store's endpoint URL and whether an HTTP host is loopback-only."""

from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, query: bool = False, credentials: str = "") -> str:
    """An http(s) URL with a host without spaces, a numeric port other than 0, no user or password, no
    fragment (and no query unless ``query``); returned without a trailing ``/`` unless it may carry a query.
    Errors never repeat the value (it may carry a password or a token); ``credentials`` says where those go."""
    if not value:
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (check the port, and brackets around an IPv6 address)") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError(f"must not carry a user or password{credentials}")
    if not parts.hostname or any(ch.isspace() for ch in value):
        raise ValueError("needs a host name, and no spaces")
    if (parts.query and not query) or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if port == 0:
        raise ValueError("has port 0")
    return value if query else value.rstrip("/")


def check_endpoint_url(value: str) -> str:
    """The store's endpoint URL, as botocore takes it."""
    return check_url(value, credentials=" (use SIDECAR_ACCESS_KEY_ID / SIDECAR_SECRET_ACCESS_KEY)")


EndpointUrl = Annotated[str, AfterValidator(check_endpoint_url)]
