"""Handshake in both roles, at the minors that matter (NI §1.2)."""

from __future__ import annotations

import pytest

from recnix.protocol import (
    ClientConnection,
    ConnectionClosed,
    ErrorReply,
    HandshakeDone,
    Op,
    ProtocolError,
    Request,
    ServerConnection,
)
from recnix.protocol import wire as W
from recnix.protocol.connection import NEED_DATA
from recnix.protocol.stderr import Error, encode_stderr
from tests.unit.protocol.test_support import connected_pair, events_until_need

MINORS = [10, 25, 33, 34, 35, 37, 38]
MAGIC1 = W.u64(W.WORKER_MAGIC_1)
MAGIC2 = W.u64(W.WORKER_MAGIC_2)
LAST = W.u64(W.Stderr.LAST)


def strs(items: list[str]) -> bytes:
    return W.encode(W.STRS, items, W.Ctx(38))


def nix_str(text: str) -> bytes:
    return W.encode(W.STR, text, W.Ctx(38))


def client_rest(minor: int, features: list[str] | None = None) -> bytes:
    """What a client sends after its version: [features], affinity, reserveSpace."""
    out = b""
    if minor >= 38:
        out += strs(features or [])
    if minor >= 14:
        out += W.u64(0)
    if minor >= 11:
        out += W.u64(0)
    return out


@pytest.mark.parametrize("minor", MINORS)
def test_our_client_against_our_server_client_minor(minor: int) -> None:
    client, server, c_done, s_done = connected_pair(minor, 35)
    eff = min(minor, 35)
    for done in (c_done, s_done):
        assert done.minor == eff and done.client_minor == minor and done.server_minor == 35
        assert done.nix_version == ("2.8.0" if eff >= 33 else None)
        assert done.trust == (2 if eff >= 35 else None)
    assert client.minor == server.minor == eff


@pytest.mark.parametrize("minor", MINORS)
def test_our_client_against_our_server_server_minor(minor: int) -> None:
    _, _, c_done, s_done = connected_pair(38, minor, trust=1)
    for done in (c_done, s_done):
        assert done.minor == minor and done.server_minor == minor
        assert done.trust == (1 if minor >= 35 else None)


@pytest.mark.parametrize("minor", MINORS)
def test_server_bytes_sequential_client(minor: int) -> None:
    """A Nix <= 2.23 client: magic alone, waits, then version and the rest."""
    server = ServerConnection(server_minor=35, nix_version="2.8.0", trust=2)
    server.receive_data(MAGIC1)
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == MAGIC2 + W.u64(0x100 | 35)
    server.receive_data(W.u64(0x100 | minor))
    eff = min(minor, 35)
    server.receive_data(client_rest(eff))
    done = server.next_event()
    assert isinstance(done, HandshakeDone) and done.minor == eff
    expected = b""
    if eff >= 33:
        expected += nix_str("2.8.0")
    if eff >= 35:
        expected += W.u64(2)
    assert server.data_to_send() == expected + LAST


def test_server_matches_the_2_8_byte_trace() -> None:
    """NI §1.2: a 2.8 client against a 1.34 server, then SetOptions."""
    server = ServerConnection(server_minor=34, nix_version="2.8.0")
    server.receive_data(bytes.fromhex("6378696e00000000"))
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == bytes.fromhex("6f69786400000000" + "2201000000000000")
    server.receive_data(bytes.fromhex("2201000000000000" + "00" * 16))
    assert isinstance(server.next_event(), HandshakeDone)
    assert server.data_to_send() == bytes.fromhex(
        "0500000000000000" + "322e382e30000000" + "73746c6100000000"
    )
    server.receive_data(W.u64(19) + W.u64(0) * 12 + W.u64(0))
    ev = server.next_event()
    assert isinstance(ev, Request) and ev.op == Op.SET_OPTIONS
    assert ev.args["options"].use_build_hook == 0


@pytest.mark.parametrize("minor", MINORS)
def test_server_pipelined_client(minor: int) -> None:
    """Nix >= 2.24 / Lix: magic and version (and everything else) in one write."""
    server = ServerConnection(server_minor=38 if minor == 38 else 35, trust=1)
    eff = min(minor, server.server_minor)
    server.receive_data(MAGIC1 + W.u64(0x100 | minor) + client_rest(eff, ["x"]))
    done = server.next_event()
    assert isinstance(done, HandshakeDone) and done.minor == eff


def test_lix_client_reads_nix_version_and_trust() -> None:
    """Lix >= 2.94 sends 1.35, affinity 0, reserveSpace 0 at once and needs trust back."""
    server = ServerConnection(trust=2, nix_version="2.8.0")
    server.receive_data(MAGIC1 + W.u64(0x123) + W.u64(0) + W.u64(0))
    assert isinstance(server.next_event(), HandshakeDone)
    out = server.data_to_send()
    assert out == MAGIC2 + W.u64(0x123) + nix_str("2.8.0") + W.u64(2) + LAST


def test_feature_exchange_is_an_intersection_and_client_goes_first() -> None:
    server = ServerConnection(server_minor=38, features=frozenset({"foo", "bar", "xyzzy"}))
    server.receive_data(MAGIC1 + W.u64(0x126))
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == MAGIC2 + W.u64(0x126)  # waits for the client's list
    server.receive_data(strs(["aap", "bar", "mies", "xyzzy"]))
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == strs(["bar", "foo", "xyzzy"])
    server.receive_data(W.u64(0) + W.u64(0))
    done = server.next_event()
    assert done.features == frozenset({"bar", "xyzzy"})

    _, _, c_done, s_done = connected_pair(
        38,
        38,
        client_features=frozenset({"bar", "aap", "mies", "xyzzy"}),
        server_features=frozenset({"foo", "bar", "xyzzy"}),
    )
    assert c_done.features == s_done.features == frozenset({"bar", "xyzzy"})


def test_no_feature_exchange_below_38() -> None:
    _, _, c_done, s_done = connected_pair(
        38, 37, client_features=frozenset({"a"}), server_features=frozenset({"a"})
    )
    assert c_done.features == s_done.features == frozenset()


def test_server_reads_the_obsolete_affinity_value() -> None:
    server = ServerConnection(server_minor=35)
    server.receive_data(MAGIC1 + W.u64(0x123) + W.u64(1) + W.u64(7) + W.u64(0))
    assert isinstance(server.next_event(), HandshakeDone)
    server.receive_data(W.u64(1) + nix_str("/nix/store/" + "a" * 32 + "-x"))
    assert server.next_event().op == Op.IS_VALID_PATH


@pytest.mark.parametrize(
    "client_bytes",
    [
        W.u64(0x12345678),  # bad magic
        MAGIC1 + W.u64(0x109),  # 1.9 is too old
        MAGIC1 + W.u64(0x223),  # major 2
        MAGIC1 + W.u64(1 << 40 | 0x123),  # out of range
    ],
)
def test_server_rejects_bad_client_hello(client_bytes: bytes) -> None:
    server = ServerConnection()
    server.receive_data(client_bytes)
    with pytest.raises(ProtocolError):
        server.next_event()


def test_server_eof_before_anything_is_closed_and_mid_handshake_is_error() -> None:
    server = ServerConnection()
    server.receive_data(b"")
    assert isinstance(server.next_event(), ConnectionClosed)
    server = ServerConnection()
    server.receive_data(MAGIC1[:5])
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        server.next_event()


def test_client_against_a_2_8_daemon() -> None:
    client = ClientConnection(35)
    client.initiate()
    assert client.data_to_send() == MAGIC1 + W.u64(0x123)
    client.receive_data(MAGIC2 + W.u64(0x122))
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == W.u64(0) + W.u64(0)
    client.receive_data(nix_str("2.8.0") + LAST)
    done = client.next_event()
    assert isinstance(done, HandshakeDone)
    assert (done.server_minor, done.minor, done.nix_version, done.trust) == (34, 34, "2.8.0", None)


def test_client_sees_handshake_error() -> None:
    client = ClientConnection(35)
    client.initiate()
    client.receive_data(MAGIC2 + W.u64(0x123) + nix_str("2.8.0") + W.u64(0))
    client.receive_data(encode_stderr(Error("denied"), W.Ctx(35)))
    events = events_until_need(client)
    assert isinstance(events[0], ErrorReply) and events[0].error.message == "denied"


def test_client_rejects_bad_daemon_magic() -> None:
    client = ClientConnection(35)
    client.initiate()
    client.receive_data(W.u64(0x6478696E) + W.u64(0x123))
    with pytest.raises(ProtocolError):
        client.next_event()
