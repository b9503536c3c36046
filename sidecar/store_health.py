"""One opinion on the object store's health, read by the uploader, /readyz, /status, the probe and metrics.

Fed by one observer of every HTTP attempt (:meth:`StoreHealth.observe`, wired to the S3 client's
``needs-retry`` event) and by the classified errors of failed calls (:meth:`StoreHealth.judge`):

- ``up``: the store answers.
- ``down``: a call failed for the store's sake (no answer, a timeout, 5xx after the in-process retries).
  Nothing is claimed; the probe asks every ``PROBE_EVERY_S`` and the first answer, to the probe or any
  request, ends the outage (uploads resume at once: :attr:`StoreHealth.on_change`).
- ``broken``: an error every request of this configuration would meet (bad credentials, missing bucket).
  Nothing is claimed and no file is parked for it; the probe asks every ``BROKEN_PROBE_EVERY_S``.

A store that answers the probe but fails the uploads again within ``FLAP_WINDOW_S`` of recovering
(a store that hangs on writes only, say) is *flapping*: the probe then waits twice as long each time (up
to ``FLAP_PROBE_CAP_S``), the outage lines are logged once per episode, and after ``FLAPS_COUNTED``
flaps the failures count as attempts of the file (so none loops uncounted forever). Throttling (SlowDown,
429) is not an outage: the file backs off on its own. An object-scope AccessDenied (a token limited to
some prefixes) parks that one file: before believing it, :meth:`StoreHealth.bucket_usable` asks the bucket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from sidecar.errors import StoreError

log = structlog.get_logger("sidecar.store")

UP, DOWN, BROKEN, UNKNOWN = "up", "down", "broken", "unknown"
PAUSE, RETRY, PARK = "pause", "retry", "park"
PROBE_EVERY_S = 1.0
BROKEN_PROBE_EVERY_S = 10.0
FLAP_WINDOW_S = 10.0
FLAP_PROBE_CAP_S = 10.0
FLAPS_COUNTED = 3
WRITES = frozenset({"PutObject", "CompleteMultipartUpload", "UploadPart"})


def _answered(status: str) -> bool:
    return status != "error" and (not status.startswith("5") or status == "501")


class StoreHealth:
    """The store is up, down (no usable answer) or broken (answers that no retry will change)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.state = UNKNOWN
        self.problem = ""
        self.hint = ""
        self._down_since = 0.0
        self._up_since = 0.0
        self._failed_requests = 0
        self.flaps = 0
        self.on_change: list[Callable[[str], None]] = []
        self.verify: Callable[[], object] | None = None  # a HeadBucket that raises StoreError (the probe's)

    # -- inputs ------------------------------------------------------------------------------------

    def observe(self, operation: str, status: str) -> None:
        """Every HTTP attempt to the store, with its status code or ``error`` for no answer."""
        if not _answered(status):
            with self._lock:
                self._failed_requests += 1
            return
        with self._lock:
            if status.startswith("2") and operation in WRITES and self._clock() - self._up_since > FLAP_WINDOW_S:
                self.flaps = 0  # a write that works, well after the last recovery: not flapping (any more)
            if self.state == BROKEN and not (status.startswith("2") and operation != "HeadObject"):
                return  # a broken store stays broken until a request of ours succeeds
            if self.state == UP:
                return
        self._set(UP, "")

    def judge(self, exc: StoreError) -> str:
        """What a failed call means for its file: pause (the store's fault: retry uncounted once it is
        healthy), retry (back off and count) or park (this file cannot be stored as it stands)."""
        if exc.scope == "bucket":
            if not exc.transient:
                self._set(BROKEN, f"{exc.operation}: {exc.code}: {exc.detail}", hint=exc.hint)
                return PAUSE
            self._set(DOWN, f"{exc.operation}: {exc.code}: {exc.detail}")
            return RETRY if self.flaps >= FLAPS_COUNTED else PAUSE
        if exc.code == "AccessDenied" and not self.bucket_usable():
            return PAUSE
        return RETRY if exc.transient else PARK

    def bucket_usable(self) -> bool:
        """Ask the bucket itself (one HeadBucket) whether this configuration can use it at all."""
        if self.verify is None:
            return True
        try:
            self.verify()
        except StoreError as exc:
            if exc.scope == "bucket" or exc.code == "AccessDenied":
                self._set(BROKEN if not exc.transient else DOWN, f"HeadBucket: {exc.code}: {exc.detail}",
                          hint=exc.hint)
                return False
        return True

    # -- outputs -----------------------------------------------------------------------------------

    def may_claim(self) -> bool:
        with self._lock:
            return self.state in (UP, UNKNOWN)

    def probe_interval(self) -> float:
        with self._lock:
            if self.state == BROKEN:
                return BROKEN_PROBE_EVERY_S
            return min(FLAP_PROBE_CAP_S, PROBE_EVERY_S * 2 ** self.flaps) if self.flaps else PROBE_EVERY_S

    def wait_unhealthy(self, timeout: float) -> bool:
        """Block until the store is down or broken (True) or ``timeout`` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.state in (DOWN, BROKEN), timeout=timeout)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"state": self.state, "reachable": None if self.state == UNKNOWN
                                   else self.state != DOWN, "problem": self.problem}
            if self.hint:
                out["hint"] = self.hint
            if self.flaps:
                out["flaps"] = self.flaps
            if self.state in (DOWN, BROKEN):
                out["since_s"] = round(self._clock() - self._down_since, 3)
            return out

    # -- transitions -------------------------------------------------------------------------------

    def _set(self, state: str, problem: str, *, hint: str = "") -> None:
        with self._lock:
            before, now = self.state, self._clock()
            if state == before:
                self.problem, self.hint = (problem, hint) if state != UP else ("", "")
                return
            if state in (DOWN, BROKEN) and before not in (DOWN, BROKEN):
                if before == UP and now - self._up_since < FLAP_WINDOW_S:
                    self.flaps += 1
                self._down_since = now
            outage_s, failed = now - self._down_since, self._failed_requests
            if state == UP:
                self._up_since, self._failed_requests = now, 0
            self.state, self.problem, self.hint = state, problem, hint
            flapping = self.flaps
            self._changed.notify_all()
        if flapping <= 1 or state == BROKEN:  # a flapping store is logged once per episode, not per flap
            if state == DOWN:
                log.error("store_unavailable", problem=problem)
            elif state == BROKEN:
                log.error("store_unusable", problem=problem, hint=hint)
            elif before in (DOWN, BROKEN):
                log.warning("store_recovered", was=before, outage_s=round(outage_s, 3), failed_requests=failed)
        elif flapping == 2 and state == DOWN:
            log.warning("store_flapping", problem=problem, hint="the store answers the probe but fails uploads; "
                        "probing less often, counting attempts from now")
        for listener in self.on_change:
            listener(state)


class StoreProbe:
    """While the store is down or broken, one cheap request (HeadBucket) per interval; silent while it is up."""

    def __init__(self, health: StoreHealth, check: Callable[[], str], stop: threading.Event, *,
                 every_s: float | None = None) -> None:
        self._health = health
        self._check = check
        self._stop = stop
        self._every_s = every_s  # None: as StoreHealth.probe_interval() says (tests pass a short fixed one)
        self.probes = 0

    def run(self) -> None:
        while not self._stop.is_set():
            if not self._health.wait_unhealthy(timeout=1.0):
                continue
            self.probes += 1
            try:
                self._check()  # its answer reaches StoreHealth through the observer
            except StoreError as exc:
                if exc.scope == "bucket" and not exc.transient:
                    self._health.judge(exc)
                log.debug("store_probe_failed", error=str(exc), error_class=exc.error_class)
            else:
                self._health.observe("HeadBucket", "200")  # a broken store that answers well is repaired
            self._stop.wait(self._every_s if self._every_s is not None else self._health.probe_interval())
