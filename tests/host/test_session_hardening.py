"""Session protocol fixes of issue 10, against a live session and a real nix-daemon:
half-closed clients, clean upstream aborts, and host paths claimed by name."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from recnix.protocol import Op
from tests.host import test_session_protocol as sp
from tests.host.conftest import NixHost, RecnixService
from tests.host.session_probe import LiveBuild, ProbeClient, recv_until_closed, sandbox_socket
from tests.host.test_session_protocol import client_for, fresh, host_add, host_dump, path_info

pytestmark = pytest.mark.host

live = sp.live  # the fixtures of the session protocol tests
secret = sp.secret


def test_half_closed_client_gets_its_reply(
    live: LiveBuild, recnix_service: RecnixService, busybox: str
) -> None:
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        # requests that need the daemon (not answered at once from the read callback)
        client.conn.send_request(Op.QUERY_REFERENCES, {"path": busybox})
        client.conn.send_request(Op.QUERY_PATH_HASH, {"path": busybox})
        client._flush()
        sock.shutdown(socket.SHUT_WR)
        client.conn.receive_data(recv_until_closed(sock))
        client.conn.receive_data(b"")
        replies = [client._event() for _ in range(2)]
        assert [type(r).__name__ for r in replies] == ["Reply", "Reply"], replies
        assert isinstance(replies[0].value, list) and len(replies[1].value) == 64
    deadline = time.monotonic() + 10
    while "half-closed its connection" not in recnix_service.log_text():
        assert time.monotonic() < deadline, "the half-close was not logged"
        time.sleep(0.1)


def test_client_abort_mid_nar_ends_the_upstream_request_cleanly(
    live: LiveBuild, nix_host_recnix: NixHost, recnix_service: RecnixService, tmp_path: Path
) -> None:
    """The NAR stream is ended early (the daemon answers with an error and its worker
    lives on) instead of the upstream connection being cut (worker dies on EOF)."""
    before = nix_host_recnix.log_text().count("unexpected end-of-file")
    name = f"aborted-{fresh()}"
    nar = host_dump(nix_host_recnix, host_add(nix_host_recnix, tmp_path, "big", "x" * 300_000))
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        args = {"name": name, "ca_method": "fixed:r:sha256", "references": [], "repair": False}
        client.conn.send_request(Op.ADD_TO_STORE, args)
        client.conn.send_data(nar[:100_000])
        client._flush()
        time.sleep(0.5)  # let the service start forwarding
    # another client is served at once, on a reused upstream connection
    with sandbox_socket(live) as sock:
        assert client_for(sock).call(Op.IS_VALID_PATH, {"path": live.drv_path}).error is None
    time.sleep(1)
    assert nix_host_recnix.log_text().count("unexpected end-of-file") == before, (
        nix_host_recnix.log_text()[-2000:]
    )
    assert not any(name in line for line in nix_host_recnix.run(["ls", "/nix/store"]).stdout)
    log = recnix_service.log_text()
    assert "went away" in log or "unexpected end of stream in framed data" in log


def test_host_path_cannot_be_claimed_by_name(
    live: LiveBuild, nix_host_recnix: NixHost, secret: str, tmp_path: Path
) -> None:
    """AddToStoreNar of an existing host path: Nix's daemon accepts any NAR for it unread,
    so recnix requires the NAR to be the path's own."""
    info = path_info(nix_host_recnix, secret)
    fake = host_dump(nix_host_recnix, host_add(nix_host_recnix, tmp_path, "fake", "not it\n"))
    args = {
        "path": secret,
        "deriver": None,
        "nar_hash": info["narHash"],
        "references": [],
        "registration_time": 0,
        "nar_size": len(fake),
        "ultimate": False,
        "sigs": [],
        "ca": info["ca"],
        "repair": False,
        "dont_check_sigs": False,
    }
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        result = client.call(Op.ADD_TO_STORE_NAR, args, data=[fake])
        assert result.error is not None
        assert secret in result.error_message and "already exists" in result.error_message
        assert client.call(Op.IS_VALID_PATH, {"path": secret}).value is False
    assert not Path(live.sandbox_path(secret)).exists()
    # control: the daemon itself accepts the claim (so the check above is not vacuous)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as direct:
        direct.connect(str(nix_host_recnix.socket))
        assert ProbeClient(direct).do_handshake()
        client = ProbeClient.__new__(ProbeClient)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as direct:
        direct.connect(str(nix_host_recnix.socket))
        client = client_for(direct)
        assert client.call(Op.ADD_TO_STORE_NAR, args, data=[fake]).error is None
