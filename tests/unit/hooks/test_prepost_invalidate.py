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


def test_a_refusal_the_hook_channel_got_is_reported_as_the_python_hook_would(
    nix_state: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bin/recnix-hook-channel hands the service's refusal over (`--failed`,
    `--refused`): the post-build hook still makes the outputs invalid unless the service
    did and fails; the pre-build hook prints the line that fails the build and poisons
    the sandbox's nix.conf; neither asks the service again."""
    drv = drv_file(tmp_path, "recnix")
    monkeypatch.setenv("DRV_PATH", drv)
    monkeypatch.setenv("OUT_PATHS", OUT)
    assert hooks.post_build_main(["--failed", "the scan failed"]) == 1
    err = capsys.readouterr().err
    assert f"output {OUT} invalidated: recnix could not finalise {drv}: the scan failed" in err
    assert not is_valid(nix_state)

    chroot = tmp_path / "chroot"
    chroot.mkdir()
    assert hooks.pre_build_main(["--refused", "no slot", drv, str(chroot)]) == 0
    line = f"recnix: cannot open a recnix session for {drv}: no slot"
    assert capsys.readouterr().out == line + "\n"
    assert (chroot / "etc" / "nix" / "nix.conf").read_text() == line + "\n"
