"""The safety rule of retention (sidecar.safedelete), on real files and a real journal: what may be deleted,
what never is, and what a race or a crash in the middle leaves behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from support.uploaded import uploaded

from sidecar import safedelete
from sidecar.journal import DELETED, Candidate, FileRow, Journal


def delete(root: Path, row: FileRow, quiet_s: float = 0.0) -> safedelete.Verdict:
    return safedelete.delete(root, row, quiet_s=quiet_s)


def test_an_uploaded_unchanged_file_is_deleted_and_nothing_is_left(journal: Journal, root: Path) -> None:
    row = uploaded(journal, root, "day/a.png", b"a" * 100)
    verdict = delete(root, row)
    assert (verdict.deleted, verdict.reason, verdict.size) == (True, "deleted", 100)
    assert sorted(p.name for p in (root / "day").iterdir()) == []  # no quarantine name left


def test_rows_not_uploaded_are_never_deleted(journal: Journal, root: Path) -> None:
    (root / "p.png").write_bytes(b"pending")
    st = (root / "p.png").stat()
    journal.record([Candidate(b"p.png", st.st_size, st.st_mtime_ns, "scan", st.st_ino, st.st_ctime_ns)])
    row = journal.get(b"p.png")
    assert row is not None
    assert delete(root, row).reason == "not_uploaded"
    assert (root / "p.png").read_bytes() == b"pending"


def test_a_file_modified_after_its_upload_is_kept(journal: Journal, root: Path) -> None:
    row = uploaded(journal, root, "a.png", b"first")
    with (root / "a.png").open("ab") as out:
        out.write(b" and more")
    assert delete(root, row).reason == "changed"
    assert (root / "a.png").read_bytes() == b"first and more"


def test_a_same_size_same_mtime_replacement_is_kept(journal: Journal, root: Path) -> None:
    """Another inode renamed over the name, with size and mtime forged to match: still not the upload."""
    row = uploaded(journal, root, "a.png", b"AAAA")
    (root / "tmp").write_bytes(b"BBBB")
    os.utime(root / "tmp", ns=(row.mtime_ns, row.mtime_ns))
    os.replace(root / "tmp", root / "a.png")
    assert delete(root, row).reason == "changed"
    assert (root / "a.png").read_bytes() == b"BBBB"


def test_a_symlink_at_the_path_is_never_followed(journal: Journal, root: Path, tmp_path: Path) -> None:
    row = uploaded(journal, root, "a.png", b"mine")
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"mine")
    (root / "a.png").unlink()
    (root / "a.png").symlink_to(outside)
    assert delete(root, row).reason == "symlink"
    assert outside.read_bytes() == b"mine" and (root / "a.png").is_symlink()


def test_a_folder_swapped_for_a_link_cannot_lead_outside(journal: Journal, root: Path, tmp_path: Path) -> None:
    row = uploaded(journal, root, "day/a.png", b"mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.png").write_bytes(b"mine")
    (root / "day" / "a.png").rename(tmp_path / "moved.png")
    (root / "day").rmdir()
    (root / "day").symlink_to(elsewhere, target_is_directory=True)
    assert delete(root, row).reason == "outside_root"
    assert (elsewhere / "a.png").read_bytes() == b"mine"


def test_a_file_held_open_for_writing_is_kept(journal: Journal, root: Path) -> None:
    """Same user, so the kernel's lease check answers: a writer still has it open."""
    row = uploaded(journal, root, "a.png", b"mine")
    with (root / "a.png").open("r+b"):
        assert delete(root, row).reason == "writing"
    assert (root / "a.png").read_bytes() == b"mine"


def test_a_doubtful_row_is_rehashed(journal: Journal, root: Path) -> None:
    """A row without an inode (from an older journal) is checked by its bytes: other bytes are kept."""
    row = uploaded(journal, root, "a.png", b"AAAA")
    doubtful = FileRow(**{**{f: getattr(row, f) for f in FileRow.__slots__}, "ino": 0, "ctime_ns": 0})
    (root / "a.png").write_bytes(b"BBBB")
    os.utime(root / "a.png", ns=(row.mtime_ns, row.mtime_ns))
    assert delete(root, doubtful).reason == "digest"
    assert (root / "a.png").read_bytes() == b"BBBB"
    (root / "a.png").write_bytes(b"AAAA")
    os.utime(root / "a.png", ns=(row.mtime_ns, row.mtime_ns))
    assert delete(root, doubtful).deleted


def test_a_file_swapped_in_after_the_check_is_put_back(journal: Journal, root: Path) -> None:
    """What a rename put at the name between check and rename ends up quarantined: it is checked and put
    back under its name, untouched."""
    row = uploaded(journal, root, "a.png", b"mine")
    parked = root / f".sidecar-deleting-{row.id}"
    (root / "a.png").unlink()
    parked.write_bytes(b"someone else's")  # as if the swap happened just before our rename
    verdict = delete(root, row)
    assert (verdict.deleted, verdict.reason) == (False, "raced")
    assert (root / "a.png").read_bytes() == b"someone else's" and not parked.exists()


def test_putting_back_never_replaces_a_newer_file(journal: Journal, root: Path) -> None:
    """A parked file that is not the upload goes back only if the name is free; else both stay."""
    row = uploaded(journal, root, "a.png", b"mine")
    parked = root / f".sidecar-deleting-{row.id}"
    os.rename(root / "a.png", parked)
    parked.write_bytes(b"changed while parked")
    (root / "a.png").write_bytes(b"newest")
    assert delete(root, row).reason == "raced"
    assert (root / "a.png").read_bytes() == b"newest" and parked.read_bytes() == b"changed while parked"


def test_a_parked_upload_is_finished_even_when_the_name_was_reused(journal: Journal, root: Path) -> None:
    """kill -9 after the rename, then ComfyUI reuses the name: the parked upload goes, the new file stays."""
    row = uploaded(journal, root, "a.png", b"mine")
    os.rename(root / "a.png", root / f".sidecar-deleting-{row.id}")
    (root / "a.png").write_bytes(b"a new image under the old name")
    assert delete(root, row).deleted
    assert sorted(p.name for p in root.iterdir()) == ["a.png"]
    assert (root / "a.png").read_bytes() == b"a new image under the old name"


def test_a_crash_between_rename_and_unlink_is_finished_next_time(journal: Journal, root: Path) -> None:
    """kill -9 after the rename: the next pass finds the row's file parked and, still the upload, deletes it."""
    row = uploaded(journal, root, "a.png", b"mine")
    os.rename(root / "a.png", root / f".sidecar-deleting-{row.id}")
    verdict = delete(root, row)
    assert verdict.deleted and list(root.iterdir()) == []
    assert journal.mark_deleted(row, reason="age")
    after = journal.get(b"a.png")
    assert after is not None and after.state == DELETED


def test_mark_deleted_does_not_clobber_a_newer_version(journal: Journal, root: Path) -> None:
    row = uploaded(journal, root, "a.png", b"mine")
    (root / "a.png").write_bytes(b"new bytes")
    st = (root / "a.png").stat()
    journal.record([Candidate(b"a.png", st.st_size, st.st_mtime_ns, "close", st.st_ino, st.st_ctime_ns)])
    assert not journal.mark_deleted(row, reason="age")
    after = journal.get(b"a.png")
    assert after is not None and after.state == "pending"


def test_outside_root_paths_are_refused(journal: Journal, root: Path) -> None:
    row = uploaded(journal, root, "a.png", b"mine")
    hostile = FileRow(**{**{f: getattr(row, f) for f in FileRow.__slots__}, "path": b"../a.png"})
    assert delete(root, hostile).reason == "outside_root"
    assert (root / "a.png").exists()


def test_a_folder_flipping_between_real_and_a_link_never_costs_a_file_outside(
    journal: Journal, root: Path, tmp_path: Path
) -> None:
    """A thread swaps `day/` between the real folder and a link to an outside folder holding files with
    the same names, sizes and mtimes, as fast as it can, while every row is deleted: the outside files all
    survive, and each file inside is either deleted once or still there with its bytes."""
    rows = [uploaded(journal, root, f"day/f{n:03d}.png", b"x" * (100 + n)) for n in range(200)]
    outside = tmp_path / "outside"
    outside.mkdir()
    for row in rows:
        target = outside / row.path.decode().split("/")[1]
        target.write_bytes(b"x" * row.size)
        os.utime(target, ns=(row.mtime_ns, row.mtime_ns))
    real, link = root / "day", root / "day-link"
    link.symlink_to(outside, target_is_directory=True)
    parked_real = root / "day-real"
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.rename(real, parked_real)
            os.rename(link, real)  # `day` is now the link
            os.rename(real, link)
            os.rename(parked_real, real)  # and the real folder again

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        verdicts = [delete(root, row) for row in rows for _ in range(3)]
    finally:
        stop.set()
        flipper.join()
    assert sorted(p.name for p in outside.iterdir()) == sorted(r.path.decode().split("/")[1] for r in rows)
    assert all(p.read_bytes() == b"x" * p.stat().st_size for p in outside.iterdir())
    assert {v.reason for v in verdicts} <= {"deleted", "outside_root", "vanished", "changed"}
    assert sum(v.deleted for v in verdicts) + len(list(real.iterdir())) == len(rows)


def test_a_dry_run_leaves_a_parked_file_alone(journal: Journal, root: Path) -> None:
    """Even the finishing of an interrupted deletion waits for a real run: a dry run deletes nothing."""
    row = uploaded(journal, root, "a.png", b"mine")
    parked = root / f".sidecar-deleting-{row.id}"
    os.rename(root / "a.png", parked)
    assert not safedelete.delete(root, row, quiet_s=0.0, dry_run=True).deleted
    assert parked.read_bytes() == b"mine"
    assert delete(root, row).deleted and not parked.exists()
