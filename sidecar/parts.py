"""Sending a multipart upload's parts in parallel while the whole file is hashed in the same pass.

One thread (the transfer's worker) reads the file once, part by part with ``pread``, feeding each part to
the whole-file MD5 and handing it to a pool that hashes the part (its Content-MD5) and uploads it. At most
``PartBudget`` part buffers exist in the whole daemon at once, so memory stays bounded by that budget times
the part size however many large files are in flight. Parts keep one size (R2 requires equal parts but
the last). The first failure stops the reading; the parts in flight finish, then the error is raised.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

UploadPart = Callable[[int, bytearray], str]
"""Uploads part ``number`` (1-based) with these bytes; returns its ETag, proven to be the part's MD5."""


class _Job:
    """One part's upload, run by a sender thread; ``result`` waits for it."""

    def __init__(self, fn: Callable[[], str]) -> None:
        self.fn: Callable[[], str] | None = fn
        self._done = threading.Event()
        self._value = ""
        self._error: BaseException | None = None

    def run(self) -> None:
        fn, self.fn = self.fn, None  # the part's bytes live in fn: let them go as soon as it has run
        try:
            if fn is not None:
                self._value = fn()
        except BaseException as exc:  # handed to the thread that waits in result()
            self._error = exc
        self._done.set()

    def result(self) -> str:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class PartBudget:
    """How many part buffers may exist at once, daemon-wide, and the threads that send them.

    The senders are daemon threads started on first use: a part stuck on a dead connection at shutdown
    must not hold the process past its stop budget (the journal keeps the upload id; the next start aborts).
    """

    def __init__(self, buffers: int, senders: int) -> None:
        self._slots = threading.BoundedSemaphore(max(1, buffers))
        self.senders = max(1, senders)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        self._slots.acquire()

    def release(self) -> None:
        self._slots.release()

    def submit(self, fn: Callable[[], str]) -> _Job:
        with self._lock:
            if not self._started:
                for n in range(self.senders):
                    threading.Thread(target=self._serve, name=f"sidecar-part-{n}", daemon=True).start()
                self._started = True
        job = _Job(fn)
        self._jobs.put(job)
        return job

    def _serve(self) -> None:
        while True:
            self._jobs.get().run()


@dataclass(frozen=True, slots=True)
class Sent:
    """What one pass read and sent: the whole-file MD5, the parts' ETags (= their MD5s), bytes read."""

    md5: str
    etags: list[str]
    total: int


class PartFailed(Exception):
    """Raised inside a part job when reading was already stopped by another part's failure."""


def read_exactly(fd: int, size: int, offset: int) -> bytearray:
    """``size`` bytes of ``fd`` from ``offset`` (fewer only at end of file), read into one bytearray.

    A bytearray, not bytes: botocore sends a bytes Body through a BytesIO (so in 16 KiB ``send`` calls,
    after an ``Expect: 100-continue`` round trip), while a bytearray, which its validator lists as a blob
    type, goes to the socket in one ``sendall``. Reading straight into it also saves a copy.
    """
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    view.release()
    if got < size:
        del data[got:]
    return data


def send_parts(
    fd: int, size: int, part_size: int, upload: UploadPart, budget: PartBudget,
    *, on_progress: Callable[[int], None] = lambda done: None, expected_md5s: tuple[str, ...] = (),
) -> Sent:
    """Read ``size`` bytes of ``fd`` once, in parts of ``part_size``; upload them in parallel.

    ``on_progress`` (bytes acknowledged so far) is called from the calling thread only.
    ``expected_md5s`` (from an earlier hashing pass) makes a part whose bytes changed meanwhile fail with
    :class:`ValueError` before it is sent. A short read ends the pass early: ``total`` then says so.
    """
    run = _Pass(upload, budget, expected_md5s)
    whole = hashlib.md5(usedforsecurity=False)
    jobs: list[_Job] = []
    total = reported = 0
    for number, offset in enumerate(range(0, size, part_size), start=1):
        if run.failed.is_set():
            break
        if run.done > reported:
            reported = run.done
            on_progress(reported)  # from this thread: progress is kept per uploading thread
        budget.acquire()
        try:
            data = read_exactly(fd, min(part_size, size - offset), offset)
        except BaseException:
            budget.release()
            raise
        whole.update(data)
        total += len(data)
        jobs.append(budget.submit(lambda n=number, d=data: run.part(n, d)))  # type: ignore[misc]
        if len(data) < min(part_size, size - offset):
            break  # the file shrank: the caller sees total != size
        del data
    etags: list[str] = []
    first: BaseException | None = None
    for job in jobs:
        try:
            etags.append(job.result())
            if run.done > reported:
                reported = run.done
                on_progress(reported)
        except PartFailed:
            continue
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first
    if len(etags) != len(jobs):
        raise PartFailed("stopped before every part was sent")
    return Sent(whole.hexdigest(), etags, total)


class _Pass:
    """The parts of one file in flight: the first failure stops the others from being sent."""

    def __init__(self, upload: UploadPart, budget: PartBudget, expected_md5s: tuple[str, ...]) -> None:
        self._upload = upload
        self._budget = budget
        self._expected = expected_md5s
        self.failed = threading.Event()
        self._lock = threading.Lock()
        self.done = 0

    def part(self, number: int, data: bytearray) -> str:
        try:
            if self.failed.is_set():
                raise PartFailed(number)
            if self._expected and hashlib.md5(data, usedforsecurity=False).hexdigest() != self._expected[number - 1]:
                raise ValueError(f"part {number} changed since it was hashed")
            etag = self._upload(number, data)
            with self._lock:
                self.done += len(data)
            return etag
        except BaseException:
            self.failed.set()
            raise
        finally:
            self._budget.release()
