"""Long polls (sidecar.waits, sidecar.jobs_http) on the real HTTP server: a waiter answers as soon as its
condition holds, never holds the last threads (/healthz stays answered), and the one over the cap gets 429."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.http import HttpServer
from sidecar.jobs_http import JobsApi
from sidecar.waits import MAX_WAITERS, TooManyWaiters, Waits


class Queue:
    def __init__(self, waits: Waits) -> None:
        self.waits = waits
        self.pending = 3
        self.flushed = 0

    def idle(self) -> dict[str, Any]:
        return {"idle": self.pending == 0, "pending": self.pending}

    def flush(self) -> int:
        self.flushed += 1
        return self.pending

    def drain(self) -> None:
        self.pending = 0
        self.waits.changed()


@pytest.fixture
def served() -> Iterator[tuple[HttpServer, Queue]]:
    waits = Waits(MAX_WAITERS)
    queue = Queue(waits)
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), token=None, health=lambda: (True, {}),
                        ready=lambda: (True, {}), status=lambda: {})
    server.routes.more_routes = JobsApi(jobs=None, waits=waits, idle=queue.idle, flush=queue.flush).handle
    server.start()
    try:
        yield server, queue
    finally:
        server.stop()


def call(server: HttpServer, path: str, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=timeout) as answer:
            return int(answer.status), json.load(answer)
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.load(exc)


def test_a_waiter_answers_when_the_condition_holds_not_at_its_timeout(served: tuple[HttpServer, Queue]) -> None:
    server, queue = served
    assert call(server, "/idle") == (503, {"idle": False, "pending": 3})
    threading.Timer(0.3, queue.drain).start()
    # Woken by the change: the client gives up after 20 s, a third of the wait it offered.
    assert call(server, "/idle?wait=60&flush=1", timeout=20) == (200, {"idle": True, "pending": 0})
    assert queue.flushed == 1
    assert call(server, "/idle?wait=abc")[0] == 400
    assert call(server, "/idle?wait=301")[0] == 400
    assert call(server, "/jobs/x")[1]["error"] == "jobs_disabled"


def test_waiters_never_take_the_last_threads_and_the_one_over_the_cap_is_told(
    served: tuple[HttpServer, Queue],
) -> None:
    server, queue = served
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(call(server, "/idle?wait=30")[0]))
               for _ in range(MAX_WAITERS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while queue.waits.waiting < MAX_WAITERS and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a counter of the server under test, not timing it
    assert queue.waits.waiting == MAX_WAITERS
    code, body = call(server, "/idle?wait=30")
    assert (code, body["error"]) == (429, "too_many_waiting_requests")
    for _ in range(20):  # every waiter holds a thread, yet the probes are answered
        assert call(server, "/healthz", timeout=5)[0] == 200
    queue.drain()
    for thread in threads:
        thread.join(10)
    assert answers == [200] * MAX_WAITERS


def test_waits_alone() -> None:
    waits = Waits(1)
    state = {"done": False}
    threading.Timer(0.2, lambda: (state.update(done=True), waits.changed())).start()
    assert waits.wait(lambda: (state["done"], state["done"]), 30) is True
    assert waits.wait(lambda: (False, "late"), 0.2) == "late"  # a timeout answers with the state then
    blocker = threading.Thread(target=lambda: waits.wait(lambda: (False, None), 1.0))
    blocker.start()
    while waits.waiting < 1:
        time.sleep(0.01)
    with pytest.raises(TooManyWaiters):
        waits.wait(lambda: (False, None), 1.0)
    blocker.join()
