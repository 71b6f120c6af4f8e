"""recnix.store.invalidate on a database with Nix's schema (the tables and trigger it touches)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from recnix.store.invalidate import InvalidateError, invalidate_paths, invalidated_message

# The part of Nix's schema.sql (2.8 to 2.34, Lix) that invalidation touches.
SCHEMA = """
create table ValidPaths (
    id integer primary key autoincrement not null,
    path text unique not null,
    hash text not null,
    registrationTime integer not null,
    deriver text, narSize integer, ultimate integer, sigs text, ca text
);
create table Refs (
    referrer integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create trigger DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
"""


def store_path(name: str) -> str:
    return f"/nix/store/{name[0] * 32}-{name}"


OUT, DEV, LIB, USER = (store_path(n) for n in ("out", "dev", "lib", "user"))


@pytest.fixture
def db_dir(tmp_path: Path) -> Path:
    """A database where OUT refers to DEV and LIB, DEV to LIB, USER to LIB, each to itself."""
    db = sqlite3.connect(tmp_path / "db.sqlite")
    db.executescript(SCHEMA)
    ids = {}
    for path in (LIB, DEV, OUT, USER):
        cur = db.execute(
            "insert into ValidPaths (path, hash, registrationTime) values (?, 'sha256:x', 0)",
            (path,),
        )
        ids[path] = cur.lastrowid
    refs = [(OUT, DEV), (OUT, LIB), (DEV, LIB), (USER, LIB)] + [(p, p) for p in ids]
    db.executemany("insert into Refs values (?, ?)", [(ids[a], ids[b]) for a, b in refs])
    db.commit()
    db.close()
    return tmp_path


def valid(db_dir: Path) -> set[str]:
    db = sqlite3.connect(db_dir / "db.sqlite")
    try:
        return {row[0] for row in db.execute("select path from ValidPaths")}
    finally:
        db.close()


def test_outputs_referring_to_each_other_go_together(db_dir: Path) -> None:
    # DEV first in the argument: the order given does not matter, referrers go first
    assert invalidate_paths([DEV, OUT], str(db_dir)) == sorted([DEV, OUT])
    assert valid(db_dir) == {LIB, USER}


def test_a_referrer_outside_refuses_and_changes_nothing(db_dir: Path) -> None:
    with pytest.raises(InvalidateError, match=rf"{LIB} is in use by .*{USER}"):
        invalidate_paths([OUT, DEV, LIB], str(db_dir))
    assert valid(db_dir) == {LIB, DEV, OUT, USER}


def test_invalid_paths_are_skipped(db_dir: Path) -> None:
    gone = store_path("gone")
    assert invalidate_paths([OUT, gone], str(db_dir)) == [OUT]
    assert invalidate_paths([OUT, gone], str(db_dir)) == []
    assert invalidate_paths([], str(db_dir)) == []


def test_no_database_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidateError, match="does not exist"):
        invalidate_paths([OUT], str(tmp_path))


def test_the_message_says_what_happens() -> None:
    one = invalidated_message([OUT], "it violates allowedReferences")
    assert one == (
        f"output {OUT} invalidated: it violates allowedReferences; the next nix-build rebuilds it"
    )
    assert "outputs" in invalidated_message([OUT, DEV], "x") and DEV in invalidated_message(
        [OUT, DEV], "x"
    )
