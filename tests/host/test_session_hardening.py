"""Session protocol fixes of issue 10, against a live session and a real nix-daemon:
half-closed clients, clean upstream aborts, and host paths claimed by name."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from recnix.protocol import ClientOptions, DerivedPath, Op
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


SANDBOX_PROBE = """{ busybox, secret, tag }:
derivation {
  name = "sandbox-probe";
  system = builtins.currentSystem;
  builder = "${builtins.storePath busybox}/bin/sh";
  args = [ "-c" "if test -e $secret; then echo LEAK > $out; else echo sealed > $out; fi" ];
  inherit secret tag;
}
"""


def test_set_options_overrides_are_ignored(
    live: LiveBuild, nix_host_recnix: NixHost, busybox: str, secret: str, tmp_path: Path
) -> None:
    """A sandboxed client asking for sandbox = false (and its own hooks and substituters)
    gets a nested build in the sandbox all the same."""
    expr = tmp_path / "probe.nix"
    expr.write_text(SANDBOX_PROBE)
    args = ["--argstr", "busybox", busybox, "--argstr", "secret", secret]
    drv = nix_host_recnix.run(["nix-instantiate", str(expr), *args, "--argstr", "tag", fresh()])
    drv_path = drv.stdout.strip()
    text = Path(drv_path).read_bytes()
    overrides = {
        "sandbox": "false",
        "build-hook": "/bin/false",
        "pre-build-hook": "",
        "substituters": "http://127.0.0.1:1",
    }
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        assert (
            client.call(Op.SET_OPTIONS, {"options": ClientOptions(overrides=overrides)}).error
            is None
        )
        added = client.call(
            Op.ADD_TEXT_TO_STORE,
            {"name": Path(drv_path).name[33:], "text": text, "references": [busybox]},
        )
        assert added.value == drv_path, added.error_message
        built = client.call(
            Op.BUILD_PATHS, {"paths": [DerivedPath(drv_path, ["out"])], "build_mode": 0}
        )
        assert built.error is None, built.error_message
    output = nix_host_recnix.run(["nix-store", "-q", "--outputs", drv_path]).stdout.strip()
    assert Path(output).read_text() == "sealed\n"
    # control: the daemon itself honours the override for its trusted root client
    nix_host_recnix.run(["nix-store", "--delete", output], check=False)
    drv2 = nix_host_recnix.run(["nix-instantiate", str(expr), *args, "--argstr", "tag", fresh()])
    leaked = nix_host_recnix.run(
        ["nix-store", "-r", drv2.stdout.strip(), "--option", "sandbox", "false"]
    ).stdout.strip()
    assert Path(leaked).read_text() == "LEAK\n"
