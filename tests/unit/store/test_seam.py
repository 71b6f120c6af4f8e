"""The store seam's shared walks (recnix.store.seam): the closure of paths over their
references through any ``query_path_info``, and the order to add a closure in. The
session, finalisation and the ssh proxy walk with them; the host tier runs them
against real nix-daemons."""

from __future__ import annotations

import asyncio

import pytest

from recnix.protocol import PathInfo
from recnix.store.seam import InvalidPathError, StoreError, closure_infos, topo_order

A, B, C, D = (f"/nix/store/{c * 32}-{c}" for c in "abcd")


def _info(*refs: str) -> PathInfo:
    return PathInfo(deriver=None, nar_hash="0" * 64, references=list(refs))


STORE = {A: _info(B, A), B: _info(C), C: _info(), D: _info(A)}


def walk(*args, **kwargs) -> dict[str, PathInfo]:
    asked: list[str] = []

    async def query(path: str) -> PathInfo | None:
        asked.append(path)
        return STORE.get(path)

    infos = asyncio.run(closure_infos(query, *args, **kwargs))
    assert len(asked) == len(set(asked)), f"a path was asked twice: {asked}"
    return infos


def test_the_closure_follows_references_once_each() -> None:
    assert set(walk([D])) == {A, B, C, D}
    assert walk([A])[A] is STORE[A]


def test_the_walk_does_not_enter_known_paths_and_can_stay_at_the_roots() -> None:
    assert set(walk([D], known={B})) == {A, D}
    assert set(walk([A, D], references=False)) == {A, D}


def test_an_invalid_path_is_named_with_where_it_was_looked_for() -> None:
    missing = "/nix/store/" + "z" * 32 + "-gone"
    with pytest.raises(InvalidPathError, match="is not valid in the host store") as e:
        walk([missing], where="the host store")
    assert e.value.path == missing and isinstance(e.value, StoreError)


def test_topo_order_puts_references_first() -> None:
    infos = {
        "/nix/store/a": _info("/nix/store/b", "/nix/store/c", "/nix/store/a"),
        "/nix/store/b": _info("/nix/store/c", "/nix/store/outside"),
        "/nix/store/c": _info(),
        "/nix/store/d": _info("/nix/store/a"),
    }
    order = topo_order(infos)
    assert sorted(order) == sorted(infos)
    pos = {p: i for i, p in enumerate(order)}
    for path, info in infos.items():
        for ref in info.references:
            if ref in infos and ref != path:
                assert pos[ref] < pos[path], order
