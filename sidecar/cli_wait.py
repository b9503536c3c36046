"""``sidecar wait PROMPT_ID`` and ``sidecar flush``: block until a job is stored, or the queue is empty, by
long-polling the running daemon (``/jobs/{id}?wait``, ``/idle?wait``). For handlers and scripts: the answer
is printed as JSON on stdout, the exit status says how it ended.

Exit status: 0 complete (``wait``) or idle (``flush``); 1 the job failed; 3 the timeout ran out first;
4 the job is unknown to the daemon and to ComfyUI; 5 no daemon answers (or it refused the token);
2 bad configuration or arguments.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from sidecar.config import Settings
from sidecar.waits import MAX_WAIT_S

EXIT_COMPLETE, EXIT_JOB_FAILED, EXIT_TIMEOUT, EXIT_UNKNOWN, EXIT_NO_DAEMON = 0, 1, 3, 4, 5


class NoDaemon(Exception):
    pass


def local_get(settings: Settings, path: str, *, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET ``path`` from the daemon of these settings (its token sent if set); (status, JSON body)."""
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host  # noqa: S104
    where = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(f"http://{where}:{settings.http_port}{path}")
    if settings.http_token:
        request.add_header("Authorization", f"Bearer {settings.http_token.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status), json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise NoDaemon(f"the daemon on {host}:{settings.http_port} refused the request: set "
                           "SIDECAR_HTTP_TOKEN to the daemon's token") from None
        try:
            return int(exc.code), json.load(exc)
        except ValueError:
            raise NoDaemon(f"the daemon on {host}:{settings.http_port} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NoDaemon(f"no daemon answering on {host}:{settings.http_port} ({reason})") from None


def _poll(settings: Settings, path: str, timeout_s: float, done: Any) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        left = max(0.0, deadline - time.monotonic())
        chunk = min(left, MAX_WAIT_S)
        sep = "&" if "?" in path else "?"
        code, doc = local_get(settings, f"{path}{sep}wait={chunk:.3f}", timeout_s=chunk + 15)
        if code == 429:  # every long-poll slot is taken: come back shortly
            time.sleep(min(1.0, left))
        elif done(code, doc) or left <= chunk:
            return code, doc


def run_wait(settings: Settings, prompt_id: str, timeout_s: float) -> int:
    path = f"/jobs/{urllib.parse.quote(prompt_id, safe='')}"
    try:
        code, doc = _poll(settings, path, timeout_s, lambda c, d: c == 200 and d.get("state") in ("complete", "failed"))
    except NoDaemon as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    print(json.dumps(doc, indent=1))
    if code == 404:
        return EXIT_UNKNOWN
    if code == 400:
        return 2
    state = doc.get("state")
    return EXIT_COMPLETE if state == "complete" else EXIT_JOB_FAILED if state == "failed" else EXIT_TIMEOUT


def run_flush(settings: Settings, timeout_s: float) -> int:
    try:
        code, doc = _poll(settings, "/idle?flush=1", timeout_s, lambda c, _d: c == 200)
    except NoDaemon as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    print(json.dumps(doc, indent=1))
    return EXIT_COMPLETE if code == 200 else EXIT_TIMEOUT
