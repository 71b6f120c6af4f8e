"""The post-build hook invalidates the outputs of an opted-in build it cannot finalise."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from recnix.hooks import prepost as hooks
from tests.unit.store.test_invalidate import SCHEMA

OUT = "/nix/store/" + "a" * 32 + "-outer"


def drv_file(tmp_path: Path, features: str) -> str:
    text = (
        f'Derive([("out","{OUT}","","")],[],[],"x86_64-linux","/bin/sh",[],'
        f'[("name","outer"),("out","{OUT}"),("requiredSystemFeatures","{features}")])'
    )
    path = tmp_path / ("d" * 32 + "-outer.drv")
    path.write_text(text)
    return str(path)


@pytest.fixture
def nix_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """NIX_STATE_DIR with a database in which OUT is valid."""
    (tmp_path / "db").mkdir()
    db = sqlite3.connect(tmp_path / "db" / "db.sqlite")
    db.executescript(SCHEMA)
    db.execute("insert into ValidPaths (path, hash, registrationTime) values (?, 'h', 0)", (OUT,))
    db.commit()
    db.close()
    monkeypatch.setenv("NIX_STATE_DIR", str(tmp_path))
    return tmp_path


def is_valid(state: Path) -> bool:
    db = sqlite3.connect(state / "db" / "db.sqlite")
    try:
        return db.execute("select 1 from ValidPaths where path = ?", (OUT,)).fetchone() is not None
    finally:
        db.close()


def test_service_down_invalidates_an_opted_in_build(nix_state: Path, tmp_path: Path) -> None:
    drv = drv_file(tmp_path, "recnix")
    with pytest.raises(hooks.HookError) as caught:
        hooks.post_build(drv, [], control_socket=str(tmp_path / "no-such-socket"))
    message = str(caught.value)
    assert message.startswith(f"output {OUT} invalidated: recnix could not finalise {drv}")
    assert "not running" in message and message.endswith("the next nix-build rebuilds it")
    assert not is_valid(nix_state)


def test_a_build_that_did_not_opt_in_is_left_alone(nix_state: Path, tmp_path: Path) -> None:
    drv = drv_file(tmp_path, "kvm")
    assert hooks.post_build(drv, [], control_socket=str(tmp_path / "no-such-socket")) == []
    assert hooks.invalidate_after_failure(drv, [], "it failed") == "it failed"
    assert is_valid(nix_state)


def test_already_invalid_outputs_keep_the_service_message(nix_state: Path, tmp_path: Path) -> None:
    drv = drv_file(tmp_path, "recnix")
    said = f"output {OUT} invalidated: because; the next nix-build rebuilds it"
    assert hooks.invalidate_after_failure(drv, [], "first") != "first"  # it was valid
    assert hooks.invalidate_after_failure(drv, [], said) == said
