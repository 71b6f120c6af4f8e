"""A daemon socket file nobody answers on (issue 20): a killed Lix daemon leaves it
behind, and Lix >= 2.94 then sends every command, root's too, to it.

The dead socket here is a file in a temporary directory named by
``NIX_DAEMON_SOCKET_PATH`` (where both Nix's and Lix's ``auto`` store look), so the
machine's own daemon socket is never touched. What recnix runs itself must work
with it: ``recnix busybox`` (``nix-store --add``), ``nix-daemon --stdio`` behind
``daemon.upstream = "stdio"``, and a whole recursive build served that way
(re-registration included); ``recnix doctor`` reports the file.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from recnix.store.upstream import Upstream
from tests import nixversion
from tests.host.conftest import (
    RECNIX_BIN,
    NixHost,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX

pytestmark = pytest.mark.host


@pytest.fixture
def dead_socket(tmp_path: Path) -> Iterator[str]:
    """A socket file whose listener is gone (as a killed daemon leaves it)."""
    path = str(tmp_path / "daemon-socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)
    assert Path(path).is_socket()
    yield path


def client_env(host: NixHost, dead: str) -> dict[str, str]:
    """A root client of the host's store with no NIX_REMOTE and the dead socket."""
    env = {k: v for k, v in host.env.items() if k != "NIX_REMOTE"}
    env["NIX_DAEMON_SOCKET_PATH"] = dead
    return env


def test_the_dead_socket_is_what_lix_uses(nix_host: NixHost, dead_socket: str, tmp_path) -> None:
    """The problem itself: root's `nix-store --add` goes to the dead socket on Lix >= 2.94
    (and fails), to the local store on Nix."""
    note = tmp_path / "note"
    note.write_text(f"stale socket {os.getpid()} {dead_socket}\n")
    done = subprocess.run(
        ["nix-store", "--add", str(note)],
        env=client_env(nix_host, dead_socket),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if nixversion.auto_store_takes_any_socket():
        assert done.returncode != 0 and dead_socket in done.stderr, done
    else:
        assert done.returncode == 0, done.stderr


def test_recnix_busybox_works_beside_a_dead_socket(
    nix_host: NixHost, dead_socket: str, busybox: str
) -> None:
    done = subprocess.run(
        [str(RECNIX_BIN), "busybox"],
        env=client_env(nix_host, dead_socket),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == busybox


def test_stdio_upstream_works_beside_a_dead_socket(
    nix_host: NixHost, dead_socket: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in client_env(nix_host, dead_socket).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NIX_REMOTE", raising=False)

    async def main() -> tuple[str, bool]:
        up = await Upstream.connect("stdio")
        try:
            return up.nix_version, await up.is_valid_path(busybox)
        finally:
            await up.close()

    assert asyncio.run(main()) == (nixversion.version_string(), True)


def test_recursive_build_with_stdio_upstream_beside_a_dead_socket(
    dead_socket: str, busybox: str, nix_bundle: str
) -> None:
    """The whole way (session over `nix-daemon --stdio`, re-registration) with the
    service's NIX_DAEMON_SOCKET_PATH naming the dead socket."""
    host = start_nix_host(hooks=True)
    try:
        service = start_recnix_service(
            host, daemon={"upstream": "stdio"}, env={"NIX_DAEMON_SOCKET_PATH": dead_socket}
        )
        try:
            runner = scenario_runner(host, busybox, nix_bundle)
            checks.check_add(runner, RECNIX)
            checks.check_inner(runner, RECNIX)
        finally:
            stop_recnix_service(service)
    finally:
        stop_nix_host(host)


def test_doctor_reports_the_dead_socket(nix_host: NixHost, dead_socket: str) -> None:
    done = subprocess.run(
        [str(RECNIX_BIN), "doctor", "--no-build"],
        env=client_env(nix_host, dead_socket),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next(
        (line for line in done.stdout.splitlines() if "  daemon-socket  " in line), done.stdout
    )
    assert f"{dead_socket} exists but nobody answers on it" in line, done.stdout
    expected = "FAIL" if nixversion.is_lix() else "warn"
    assert line.startswith(expected), line
