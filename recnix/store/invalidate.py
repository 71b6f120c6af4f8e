"""Make a build's outputs invalid: recnix's finalisation is all or nothing.

An output whose references recnix could not add and check (allowedReferences & co.,
a failed re-registration, a service that died) must not stay valid: the next
`nix-build` would return it, and the GC or `nix copy` could leave it pointing at
nothing. Nix's own ways to invalidate a path (`nix-store --delete`, even with
`--ignore-liveness`) refuse while the building worker holds its temporary roots on
the outputs, which it does until the build's client is gone, i.e. during the
post-build hook. So this does what Nix's ``invalidatePathChecked`` does, in Nix's
database: ``delete from ValidPaths`` in one transaction, referrers first, refusing
when a path outside the set refers to one of them (the schema's ``on delete
restrict``). The files stay in the store as an invalid path: the next build of the
derivation replaces them, the GC removes them.

Standard library only: the post-build hook imports this when the service is gone.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterable

DEFAULT_STATE_DIR = "/nix/var/nix"
DB_TIMEOUT = 600.0  # seconds to wait for Nix's database lock


class InvalidateError(Exception):
    """The outputs could not be made invalid (the message says why)."""


def nix_db_dir() -> str:
    """Nix's database directory: ``$NIX_STATE_DIR/db`` (default /nix/var/nix/db)."""
    return os.path.join(os.environ.get("NIX_STATE_DIR") or DEFAULT_STATE_DIR, "db")


def invalidate_paths(paths: Iterable[str], db_dir: str | None = None) -> list[str]:
    """Make ``paths`` invalid in Nix's database, all or none; return those that were valid.

    InvalidateError, and nothing changed, when a valid path outside ``paths`` refers to
    one of them, or the database cannot be written. Needs root (the database is Nix's).
    """
    wanted = sorted(set(paths))
    if not wanted:
        return []
    db_dir = db_dir or nix_db_dir()
    try:
        # Nix holds big-lock shared while it uses the database, exclusively to upgrade it.
        lock = os.open(os.path.join(db_dir, "big-lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidateError(f"cannot open Nix's database lock in {db_dir}: {e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        return _invalidate(os.path.join(db_dir, "db.sqlite"), wanted)
    except sqlite3.Error as e:
        raise InvalidateError(f"cannot update Nix's database in {db_dir}: {e}") from None
    finally:
        os.close(lock)


def _invalidate(db_path: str, wanted: list[str]) -> list[str]:
    if not os.path.exists(db_path):
        raise InvalidateError(f"Nix's database {db_path} does not exist")
    db = sqlite3.connect(db_path, timeout=DB_TIMEOUT, isolation_level=None)
    try:
        db.execute("pragma foreign_keys = 1")
        db.execute("begin immediate")
        try:
            marks = ",".join("?" * len(wanted))
            query = f"select id, path from ValidPaths where path in ({marks})"
            ids: dict[int, str] = dict(db.execute(query, wanted).fetchall())
            edges = _referrers(db, list(ids))
            outside = sorted({r for r, ref in edges if r not in ids})
            if outside:
                used = sorted({ids[ref] for r, ref in edges if r not in ids})
                names = sorted(row[0] for row in _paths_of(db, outside))
                raise InvalidateError(f"{', '.join(used)} is in use by {', '.join(names)}")
            for path_id in _referrers_first(list(ids), edges):
                db.execute("delete from ValidPaths where id = ?", (path_id,))
            db.execute("commit")
        except BaseException:
            db.execute("rollback")
            raise
    finally:
        db.close()
    return sorted(ids.values())


def _referrers(db: sqlite3.Connection, ids: list[int]) -> list[tuple[int, int]]:
    """(referrer, reference) of every reference to ``ids`` but self-references."""
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"select referrer, reference from Refs where reference in ({marks})", ids
    ).fetchall()
    return [(r, ref) for r, ref in rows if r != ref]


def _paths_of(db: sqlite3.Connection, ids: list[int]) -> list[tuple[str]]:
    marks = ",".join("?" * len(ids))
    return db.execute(f"select path from ValidPaths where id in ({marks})", ids).fetchall()


def _referrers_first(ids: list[int], edges: list[tuple[int, int]]) -> list[int]:
    """``ids`` ordered so that each comes before everything it refers to."""
    left = set(ids)
    order: list[int] = []
    while left:
        referenced = {ref for r, ref in edges if r in left and ref in left}
        free = sorted(left - referenced) or sorted(left)  # a cycle cannot be registered
        order.extend(free)
        left -= set(free)
    return order


def invalidated_message(outputs: Iterable[str], reason: str) -> str:
    """What the build's log says about outputs recnix made invalid."""
    paths = sorted(outputs)
    if len(paths) == 1:
        return f"output {paths[0]} invalidated: {reason}; the next nix-build rebuilds it"
    return f"outputs {' and '.join(paths)} invalidated: {reason}; the next nix-build rebuilds them"


__all__ = [
    "InvalidateError",
    "invalidate_paths",
    "invalidated_message",
    "nix_db_dir",
]
