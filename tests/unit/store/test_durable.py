"""recnix.store.durable: every file, directory and parent directory of the paths is
fsynced, and a parent shared by a batch of paths (/nix/store) only once."""

from __future__ import annotations

from pathlib import Path

import pytest

from recnix.store import durable


def test_fsync_paths_syncs_everything_and_each_parent_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "a-file").write_text("a")
    tree = store / "b-dir"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("f")
    (tree / "link").symlink_to("sub/f")
    (store / "c-link").symlink_to("a-file")
    synced: list[str] = []
    monkeypatch.setattr(durable, "_fsync", synced.append)
    paths = [str(store / n) for n in ("a-file", "b-dir", "c-link")]
    durable.fsync_paths(paths)
    assert sorted(synced) == sorted(
        [str(store / "a-file"), str(tree), str(tree / "sub"), str(tree / "sub" / "f"), str(store)]
    )
    assert synced[-1] == str(store)  # after everything below it


def test_fsync_tree_alone_syncs_its_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x").write_text("x")
    synced: list[str] = []
    monkeypatch.setattr(durable, "_fsync", synced.append)
    durable.fsync_tree(str(tmp_path / "x"))
    assert synced == [str(tmp_path / "x"), str(tmp_path)]
