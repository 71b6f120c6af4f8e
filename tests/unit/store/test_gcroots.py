"""Per-session GC-root directories (recnix/store/gcroots.py) on a real filesystem."""

from __future__ import annotations

import os

import pytest

from recnix.store.gcroots import SessionRoots, sweep

A = "/nix/store/00000000000000000000000000000000-a"
B = "/nix/store/11111111111111111111111111111111-b"


def test_add_is_idempotent_and_rooted_reads_back(tmp_path):
    roots = SessionRoots(tmp_path, "s1")
    roots.add([A])
    roots.add([A, B])
    assert roots.rooted() == {A, B}
    assert os.readlink(tmp_path / "s1" / os.path.basename(B)) == B


def test_a_clashing_link_is_an_error(tmp_path):
    roots = SessionRoots(tmp_path, "s1")
    (tmp_path / "s1").mkdir()
    os.symlink("/nix/store/22222222222222222222222222222222-elsewhere", tmp_path / "s1" / "x")
    with pytest.raises(FileExistsError):
        roots.add(["/nix/store/33333333333333333333333333333333/x"])


def test_remove_and_sweep(tmp_path):
    for sid in ("keep", "stale"):
        SessionRoots(tmp_path, sid).add([A])
    assert sweep(tmp_path, ["keep"]) == ["stale"]
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    SessionRoots(tmp_path, "keep").remove()
    assert os.listdir(tmp_path) == []
    assert sweep(tmp_path / "absent", []) == []
