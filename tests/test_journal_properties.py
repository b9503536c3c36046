"""Random sequences of discoveries, claims, outcomes, crashes and operator actions driven through a real
journal, with the invariants of docs/ARCHITECTURE.md checked against a model after every step.

Seeded: a failure names its seed and step, and replays exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.journal import Candidate, FileRow, Journal
from sidecar.journal_schema import Version

PATHS = [b"a.png", b"b/c.png", b"d.mp4", b"\xff.png"]
STEPS = 250


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Model:
    """What must be true of each path, whatever the journal does internally."""

    latest: dict[bytes, Version] = field(default_factory=dict)
    settled: dict[bytes, str] = field(default_factory=dict)  # terminal outcome of the latest version, if any
    claimed: dict[bytes, FileRow] = field(default_factory=dict)  # rows handed to "workers", not yet answered
    uploaded_md5: dict[bytes, str] = field(default_factory=dict)


def check(journal: Journal, model: Model, where: str) -> None:
    for path, version in model.latest.items():
        row = journal.get(path)
        assert row is not None, f"{where}: {path!r} has no row"
        assert row.version == version, f"{where}: {path!r} records {row.version}, the file is {version}"
        outcome = model.settled.get(path)
        if outcome is None:  # nobody has answered for this version yet: it must still be on its way
            assert row.state in ("pending", "uploading"), f"{where}: {path!r} untried version is {row.state}"
        elif path not in model.claimed:
            assert row.state == outcome, f"{where}: {path!r} is {row.state}, its outcome was {outcome}"
        if row.state == "uploading":
            assert path in model.claimed, f"{where}: {path!r} is uploading but no worker holds it"
        if row.state == "uploaded":
            assert row.md5 == model.uploaded_md5[path] and row.key and row.etag, f"{where}: {path!r} facts lost"
        assert row.attempts >= 0
    stats = journal.stats()
    assert sum(n for n, _ in stats.values()) == len(model.latest), f"{where}: rows {stats} vs {len(model.latest)}"


def step(rng: random.Random, journal: Journal, model: Model, clock: Clock, tmp: Path) -> tuple[str, Journal]:
    action = rng.choice(["record", "record", "claim", "answer", "answer", "crash", "requeue", "tick"])
    if action == "record":
        path = rng.choice(PATHS)
        old = model.latest.get(path)
        version = old if old is not None and rng.random() < 0.3 else (
            rng.randint(1, 5), rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3))
        journal.record([Candidate(path, *version[:2], "close", *version[2:])])
        if old != version or model.settled.get(path) == "skipped":
            model.latest[path] = version
            model.settled.pop(path, None)
    elif action == "claim":
        for row in journal.claim(rng.randint(1, 3)):
            assert row.path not in model.claimed, f"{row.path!r} claimed twice at once"
            model.claimed[row.path] = row
    elif action == "answer" and model.claimed:
        path = rng.choice(sorted(model.claimed))
        row = model.claimed.pop(path)
        outcome = rng.choice(["uploaded", "retry", "failed", "skipped", "paused"])
        md5 = f"{rng.getrandbits(64):016x}"
        if outcome == "uploaded":
            journal.mark_uploaded(row, uploaded=row.version, md5=md5, key=f"k/{path!r}", etag=md5)
        elif outcome in ("retry", "paused"):
            journal.mark_retry(row, error="x", error_class="X", delay_s=rng.choice([0, 5, 50]),
                               count=outcome == "retry")
        elif outcome == "failed":
            journal.mark_failed(row, error="x", error_class="X")
        else:
            journal.mark_skipped(row, reason="vanished")
        if outcome == "uploaded":
            model.uploaded_md5[path] = md5
        if row.version == model.latest[path] and outcome in ("uploaded", "failed", "skipped"):
            model.settled[path] = outcome
        action = f"answer:{outcome}"
    elif action == "crash":  # kill -9: no answers come; the next start reopens and resets
        journal.close()
        journal = Journal(tmp, clock=clock)
        journal.reset_inflight()
        model.claimed.clear()
    elif action == "requeue":
        journal.requeue_failed()
        for path, outcome in list(model.settled.items()):
            if outcome == "failed":
                model.settled.pop(path)
    else:
        clock.now += rng.choice([1, 10, 100])
    return action, journal


@pytest.mark.parametrize("seed", range(24))
def test_random_histories_keep_the_invariants(tmp_path: Path, seed: int) -> None:
    """Whatever happens, in whatever order: one row per file holding its latest version; a version nobody
    answered for is pending or uploading (never parked untried); a claimed row is held by one worker only;
    a crash leaves nothing 'uploading'; an uploaded row keeps its md5, key and etag."""
    rng = random.Random(seed)
    clock = Clock()
    db = tmp_path / "journal.sqlite3"
    journal = Journal(db, clock=clock)
    model = Model()
    history: list[str] = []
    for n in range(STEPS):
        action, journal = step(rng, journal, model, clock, db)
        history.append(action)
        check(journal, model, f"seed {seed} step {n} after {history[-6:]}")
    journal.close()
