"""GET from local HTTP servers (the daemon's endpoint, Prometheus) without any proxy from the environment."""

from __future__ import annotations

import urllib.error
import urllib.request

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore any HTTP(S)_PROXY


def http_get(url: str, token: str | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are answers too; (0, b"") when nothing answers."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()
    except OSError:
        return 0, b""
