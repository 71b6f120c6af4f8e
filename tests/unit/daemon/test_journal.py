"""Session journals: what is written is what a restarted service reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from recnix.daemon.journal import SessionJournal, SessionRecord, journals, replay

A = "/nix/store/" + "a" * 32 + "-a"
B = "/nix/store/" + "b" * 32 + "-b.drv"


def header(sid: str = "s1") -> SessionRecord:
    return SessionRecord(
        sid=sid,
        drv_path="/nix/store/" + "c" * 32 + "-outer.drv",
        chroot="/nix/store/" + "c" * 32 + "-outer.drv.chroot",
        readonly=False,
        depth=2,
        parent="s0",
        holds_slot=False,
    )


def test_changes_accumulate(tmp_path: Path) -> None:
    journal = SessionJournal.create(tmp_path, header())
    journal.record(allowed={A}, materialised={A: "mount"}, added_bytes=10)
    journal.record(builds=1, build_requests={B})
    journal.record(allowed={B}, added_bytes=25)
    journal.record(builds=2, build_requests=set(), realisations={"sha256:x!out"})
    (path,) = journals(tmp_path)
    record = replay(path)
    assert (record.sid, record.depth, record.parent, record.readonly) == ("s1", 2, "s0", False)
    assert record.allowed == {A, B}
    assert record.materialised == {A: "mount"}
    assert record.build_requests == {B}
    assert record.realisations == {"sha256:x!out"}
    assert (record.builds, record.added_bytes) == (2, 25)
    journal.remove()
    assert journals(tmp_path) == []


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    journal = SessionJournal.create(tmp_path, header())
    journal.record(allowed={A})
    with journal.path.open("a") as f:
        f.write('{"allowed": ["/nix/store/')  # the service died while writing
    assert replay(journal.path).allowed == {A}


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    journal = SessionJournal.create(tmp_path, header())
    with journal.path.open("a") as f:
        f.write("garbage\n")
    journal.record(allowed={A})
    with pytest.raises(ValueError, match="line 2"):
        replay(journal.path)


def test_a_bad_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"sid": "x"}\n')
    with pytest.raises(ValueError, match="bad header"):
        replay(path)
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        replay(path)


def test_a_session_id_is_journaled_once(tmp_path: Path) -> None:
    SessionJournal.create(tmp_path, header())
    with pytest.raises(FileExistsError):
        SessionJournal.create(tmp_path, header())


def test_finalising_is_replayed(tmp_path: Path) -> None:
    """A session whose finalisation began says so after a restart (and only then)."""
    journal = SessionJournal.create(tmp_path, header())
    journal.record(allowed={A})
    (path,) = journals(tmp_path)
    assert replay(path).finalising is False
    journal.record(finalising=True)
    journal.record(added_bytes=3)
    assert replay(path).finalising is True
