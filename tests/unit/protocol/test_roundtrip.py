"""Property tests: every request, reply, log message and compound type round-trips
at every minor where it exists; truncated or corrupted input only ever raises
ProtocolError."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recnix.protocol import OPS, ProtocolError, ServerConnection
from recnix.protocol import schema as S
from recnix.protocol import wire as W
from recnix.protocol.connection import NEED_DATA
from recnix.protocol.stderr import encode_stderr, read_stderr
from tests.unit.protocol.test_support import (
    FEATURE_SETS,
    MINORS,
    connected_pair,
    events_until_need,
    for_codec,
    pump,
    stderr_messages,
)

FAST = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feature_sets(minor: int) -> st.SearchStrategy[frozenset[str]]:
    return st.sampled_from(FEATURE_SETS) if minor >= 38 else st.just(frozenset())


def _roundtrip(codec: W.Codec, value: Any, ctx: W.Ctx) -> bytes:
    data = W.encode(codec, value, ctx)
    decoded, used = W.decode_all(codec, data, ctx)
    assert decoded == value
    assert used == len(data)
    return data


def _byte_by_byte(codec: W.Codec, data: bytes, ctx: W.Ctx) -> Any:
    buf = W.ReceiveBuffer()
    dec = W.Decoder(codec.read(ctx))
    for i in range(len(data)):
        assert not dec.step(buf) or len(data) == 0
        buf.feed(data[i : i + 1])
    assert dec.step(buf)
    return dec.value


OP_MINORS = [
    pytest.param(spec.op, minor, id=f"{spec.op.name}-{minor}")
    for spec in OPS.values()
    for minor in MINORS
    if spec.exists(minor)
]


@pytest.mark.parametrize(("op", "minor"), OP_MINORS)
@FAST
@given(data=st.data())
def test_request_and_reply_roundtrip(op: int, minor: int, data: st.DataObject) -> None:
    spec = OPS[op]
    ctx = W.Ctx(minor, data.draw(_feature_sets(minor)))
    args = data.draw(for_codec(spec.request, ctx))
    raw = _roundtrip(spec.request, args, ctx)
    assert _byte_by_byte(spec.request, raw, ctx) == args
    if spec.reply is not None:
        reply = data.draw(for_codec(spec.reply, ctx))
        _roundtrip(spec.reply, reply, ctx)


COMPOUND = {
    "PathInfo": S.PATH_INFO,
    "ValidPathInfo": S.VALID_PATH_INFO,
    "ValidPathInfo16": S.VALID_PATH_INFO_16,
    "BuildResult": S.BUILD_RESULT,
    "KeyedBuildResult": S.KEYED_BUILD_RESULT,
    "DerivedPath": S.DERIVED_PATH,
    "BasicDerivation": S.BASIC_DERIVATION,
    "Realisation": S.REALISATION,
    "DrvOutput": S.DRV_OUTPUT,
    "ClientOptions": S.CLIENT_OPTIONS,
    "SubstitutablePathInfo": S.SUBSTITUTABLE_PATH_INFO,
    "Missing": S.MISSING,
    "GCResult": S.GC_RESULT,
    "ClientHandshakeInfo": S.CLIENT_HANDSHAKE_INFO,
}


@pytest.mark.parametrize("name", sorted(COMPOUND))
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_compound_roundtrip_prefixes_and_corruption(name: str, data: st.DataObject) -> None:
    codec = COMPOUND[name]
    minor = data.draw(st.sampled_from(MINORS))
    ctx = W.Ctx(minor, data.draw(_feature_sets(minor)))
    value = data.draw(for_codec(codec, ctx))
    raw = _roundtrip(codec, value, ctx)
    for n in range(len(raw)):
        with pytest.raises(ProtocolError):
            W.decode_all(codec, raw[:n], ctx)
    if raw:
        pos = data.draw(st.integers(0, len(raw) - 1))
        flip = data.draw(st.integers(1, 255))
        bad = bytearray(raw)
        bad[pos] ^= flip
        with contextlib.suppress(ProtocolError):
            W.decode_all(codec, bytes(bad), ctx)


@pytest.mark.parametrize("minor", list(MINORS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_stderr_roundtrip(minor: int, data: st.DataObject) -> None:
    ctx = W.Ctx(minor)
    msg = data.draw(stderr_messages(minor))
    raw = encode_stderr(msg, ctx)
    buf = W.ReceiveBuffer()
    buf.feed(raw)
    buf.eof = True
    dec = W.Decoder(read_stderr(ctx))
    assert dec.step(buf)
    assert dec.value == msg
    assert len(buf) == 0
    for n in range(len(raw)):
        buf = W.ReceiveBuffer()
        buf.feed(raw[:n])
        buf.eof = True
        with pytest.raises(ProtocolError):
            W.Decoder(read_stderr(ctx)).step(buf)


@pytest.mark.parametrize("minor", [10, 19, 20, 25, 26, 35])
def test_old_clients_get_activity_as_text(minor: int) -> None:
    from recnix.protocol import Next, Result, StartActivity, StopActivity

    ctx = W.Ctx(minor)
    start = encode_stderr(StartActivity(1, 3, 105, "building foo", [], 0), ctx)
    if minor < 20:
        assert start == encode_stderr(Next("building foo...\n"), ctx)
        assert encode_stderr(StopActivity(1), ctx) == b""
        assert encode_stderr(Result(1, 101, ["x"]), ctx) == b""
    else:
        assert start.startswith(W.u64(W.Stderr.START_ACTIVITY))


# ------------------------------------------------------------------ connection level


def _server_at(minor: int, features: frozenset[str] = frozenset()) -> ServerConnection:
    _, server, _, _ = connected_pair(minor, min(minor, 38) if minor >= 35 else 35, features)
    server.data_to_send()
    return server


def _drain_expecting_protocol_error_or_close(server: ServerConnection) -> None:
    for _ in range(10000):
        try:
            ev = server.next_event()
        except ProtocolError:
            return
        if ev is NEED_DATA:
            raise AssertionError("NEED_DATA after EOF")
        if type(ev).__name__ == "ConnectionClosed":
            return
    raise AssertionError("no end after EOF (hang?)")


@pytest.mark.parametrize("minor", [10, 17, 25, 30, 34, 35, 38])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_server_truncated_and_corrupted_requests(minor: int, data: st.DataObject) -> None:
    spec = data.draw(st.sampled_from([s for s in OPS.values() if s.exists(minor)]))
    server = _server_at(minor)
    ctx = server.ctx
    assert ctx is not None
    args = data.draw(for_codec(spec.request, ctx))
    raw = W.u64(spec.op) + W.encode(spec.request, args, ctx)
    # byte by byte gives the request
    for i in range(len(raw)):
        assert server.next_event() is NEED_DATA
        server.receive_data(raw[i : i + 1])
    ev = server.next_event()
    assert ev.op == spec.op and ev.args == args
    # a truncated request then EOF is a ProtocolError
    cut = data.draw(st.integers(1, len(raw) - 1))
    server = _server_at(minor)
    server.receive_data(raw[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        server.next_event()
    # corrupted: only ProtocolError, and it ends
    bad = bytearray(raw)
    pos = data.draw(st.integers(0, len(raw) - 1))
    bad[pos] ^= data.draw(st.integers(1, 255))
    server = _server_at(minor)
    server.receive_data(bytes(bad))
    server.receive_data(b"")
    _drain_expecting_protocol_error_or_close(server)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_client_truncated_replies(data: st.DataObject) -> None:
    minor = data.draw(st.sampled_from([25, 34, 35, 37]))
    client, server, _, _ = connected_pair(minor, 38)
    spec = data.draw(st.sampled_from([s for s in OPS.values() if s.reply and s.exists(minor)]))
    args = data.draw(for_codec(spec.request, client.ctx))
    client.send_request(spec.op, args)
    pump(client, server)
    events_until_need(server)
    reply = data.draw(for_codec(spec.reply, server.ctx))
    server.send_reply(spec.op, reply)
    raw = server.data_to_send()
    cut = data.draw(st.integers(0, len(raw) - 1))
    if cut:
        client.receive_data(raw[:cut])
        assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(ProtocolError):
        client.next_event()


def _drain_any(conn: Any) -> None:
    """Pull events after EOF: only ProtocolError may escape, and it must end."""
    for _ in range(100000):
        try:
            ev = conn.next_event()
        except ProtocolError:
            return
        if ev is NEED_DATA or type(ev).__name__ == "ConnectionClosed":
            return
    raise AssertionError("no end after EOF (hang?)")


@settings(max_examples=300, deadline=None)
@given(
    junk=st.binary(max_size=200),
    op=st.sampled_from(sorted(OPS)),
    minor=st.sampled_from([10, 21, 22, 25, 34, 35, 38]),
)
def test_random_bytes_only_raise_protocol_error(junk: bytes, op: int, minor: int) -> None:
    # into a fresh server (handshake), an established server (a known op, then junk), a client
    fresh = ServerConnection()
    fresh.receive_data(W.u64(W.WORKER_MAGIC_1))
    established = _server_at(minor)
    established.receive_data(W.u64(op))
    client, _, _, _ = connected_pair(minor, 38)
    client.send_request(OPS[26].op, {"path": "/nix/store/x"})
    for conn in (fresh, established, client):
        if junk:
            conn.receive_data(junk)
        conn.receive_data(b"")
        _drain_any(conn)
