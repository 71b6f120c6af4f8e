"""recnix.store.storeenv: the local store instead of a dead daemon socket (issue 20)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from recnix.store import storeenv


def test_dead_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    assert not storeenv.dead_socket(path)  # no file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)
        assert not storeenv.dead_socket(path)  # answered
    assert storeenv.dead_socket(path)  # the file is left, nobody listens
    (tmp_path / "file").write_text("")
    assert not storeenv.dead_socket(str(tmp_path / "file"))


def test_local_env_is_always_local() -> None:
    assert storeenv.local_env({"NIX_REMOTE": "daemon", "X": "1"}) == {
        "NIX_REMOTE": "local",
        "X": "1",
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="root's choice: the tests run as root")
def test_client_env_goes_local_only_beside_a_dead_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    env = {"NIX_DAEMON_SOCKET_PATH": path}
    assert storeenv.client_env(env) == env  # no socket file: Nix decides
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)
        assert storeenv.client_env(env) == env  # a daemon answers
    assert storeenv.client_env(env) == {**env, "NIX_REMOTE": "local"}
    chosen = {**env, "NIX_REMOTE": "unix:///elsewhere"}
    assert storeenv.client_env(chosen) == chosen  # the user's choice stays
