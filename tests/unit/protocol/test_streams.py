"""Trailing streams (framed, plain NAR, STDERR_READ tunnel, AddMultipleToStore),
replies through the client, and strictness of the server on bad input."""

from __future__ import annotations

import pytest

from recnix.protocol import (
    ConnectionClosed,
    Data,
    EndOfData,
    ErrorReply,
    Log,
    MultipleParser,
    NarEnd,
    NarStart,
    Op,
    PathInfo,
    ProtocolError,
    Read,
    Reply,
    Request,
    ServerConnection,
    ValidPathInfo,
    Write,
    encode_multiple_entry,
    encode_multiple_header,
)
from recnix.protocol import wire as W
from recnix.protocol.connection import NEED_DATA
from tests.unit.protocol.test_support import (
    connected_pair,
    events_until_need,
    nar_dir,
    nar_file,
    pump,
)

P1 = "/nix/store/" + "a" * 32 + "-one"
P2 = "/nix/store/" + "b" * 32 + "-two"
NAR1 = nar_file(b"hello world\n" * 1000, executable=True)
NAR2 = nar_dir({b"a": b"x" * 17, b"b": b""})


def _collect_stream(conn) -> tuple[bytes, list]:
    data = b""
    events = events_until_need(conn)
    others = []
    for ev in events:
        if isinstance(ev, Data):
            data += ev.data
        else:
            others.append(ev)
    return data, others


def _add_to_store_args(minor: int) -> dict:
    if minor >= 25:
        return {"name": "x", "ca_method": "fixed:r:sha256", "references": [P2], "repair": False}
    return {"name": "x", "fixed": True, "recursive": 1, "hash_algo": "sha256"}


@pytest.mark.parametrize("minor", [24, 25, 35, 38])
def test_add_to_store_stream_then_next_request(minor: int) -> None:
    client, server, _, _ = connected_pair(minor, 38)
    client.send_request(Op.ADD_TO_STORE, _add_to_store_args(minor))
    for i in range(0, len(NAR1), 1000):
        client.send_data(NAR1[i : i + 1000])
    client.send_end_of_data()
    client.send_request(Op.IS_VALID_PATH, {"path": P1})
    pump(client, server)
    data, others = _collect_stream(server)
    assert data == NAR1
    expected = _add_to_store_args(minor)
    assert isinstance(others[0], Request)
    assert {k: others[0].args[k] for k in expected} == expected
    assert isinstance(others[1], EndOfData)
    assert others[2] == Request(Op.IS_VALID_PATH, {"path": P1})
    info = PathInfo(None, "ab" * 32, [P2], 5, len(NAR1), ca="fixed:r:sha256:xyz")
    if minor < 16:
        info = PathInfo(None, "ab" * 32, [P2], 5, len(NAR1))
    reply = ValidPathInfo(P1, info) if minor >= 25 else P1
    server.send_reply(Op.ADD_TO_STORE, reply)
    server.send_reply(Op.IS_VALID_PATH, True)
    pump(server, client)
    assert events_until_need(client) == [
        Reply(Op.ADD_TO_STORE, reply),
        Reply(Op.IS_VALID_PATH, True),
    ]


@pytest.mark.parametrize("minor", [20, 21, 22, 23, 35])
def test_add_to_store_nar_all_layouts(minor: int) -> None:
    client, server, _, _ = connected_pair(minor, 35)
    args = {
        "path": P1,
        "deriver": None,
        "nar_hash": "cd" * 32,
        "references": [],
        "registration_time": 0,
        "nar_size": len(NAR1),
        "ultimate": False,
        "sigs": [],
        "ca": None,
        "repair": False,
        "dont_check_sigs": False,
    }
    client.send_request(Op.ADD_TO_STORE_NAR, args)
    tunnel = 21 <= minor < 23
    if not tunnel:
        client.send_data(NAR1[:100])
        client.send_data(NAR1[100:])
        client.send_end_of_data()
    pump(client, server)
    got = b""
    done = False
    reads = 0
    for _ in range(1000):
        for ev in events_until_need(server):
            if isinstance(ev, Data):
                got += ev.data
            elif isinstance(ev, EndOfData):
                done = True
            else:
                assert ev == Request(Op.ADD_TO_STORE_NAR, args)
        if done:
            break
        assert tunnel
        pump(server, client)
        for ev in events_until_need(client):
            assert isinstance(ev, Log) and isinstance(ev.msg, Read)
            reads += 1
            client.send_tunnel_data(NAR1[len(got) : len(got) + min(ev.msg.length, 5000)])
        pump(client, server)
    assert got == NAR1 and done
    assert (reads > 1) == tunnel
    server.send_reply(Op.ADD_TO_STORE_NAR)
    pump(server, client)
    assert events_until_need(client) == [Reply(Op.ADD_TO_STORE_NAR, None)]


def test_tunnel_rejects_empty_and_overlong_replies() -> None:
    for answer in (b"", b"x" * 70000):
        client, server, _, _ = connected_pair(22, 35)
        client.send_request(Op.ADD_TO_STORE_NAR, {"path": P1, "nar_hash": "", "nar_size": 1})
        pump(client, server)
        assert isinstance(server.next_event(), Request)
        assert server.next_event() is NEED_DATA
        pump(server, client)
        assert isinstance(events_until_need(client)[0].msg, Read)
        client.send_tunnel_data(answer if answer else b"")
        pump(client, server)
        with pytest.raises(ProtocolError):
            events_until_need(server)


def test_tunnel_rejects_data_after_the_nar() -> None:
    client, server, _, _ = connected_pair(21, 35)
    client.send_request(Op.ADD_TO_STORE_NAR, {"path": P1, "nar_hash": "", "nar_size": 1})
    pump(client, server)
    events_until_need(server)
    pump(server, client)
    events_until_need(client)
    client.send_tunnel_data(NAR2 + b"12345678")
    pump(client, server)
    with pytest.raises(ProtocolError, match="after the end of the NAR"):
        events_until_need(server)


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_nar_from_path_reply_streams_the_nar(step: int) -> None:
    client, server, _, _ = connected_pair(34, 35)
    client.send_request(Op.NAR_FROM_PATH, {"path": P1})
    client.send_request(Op.QUERY_REFERRERS, {"path": P1})
    pump(client, server)
    assert events_until_need(server) == [
        Request(Op.NAR_FROM_PATH, {"path": P1}),
        Request(Op.QUERY_REFERRERS, {"path": P1}),
    ]
    server.send_reply(Op.NAR_FROM_PATH)
    server.send_raw(NAR2)
    server.send_reply(Op.QUERY_REFERRERS, [P2])
    raw = server.data_to_send()
    events = []
    for i in range(0, len(raw), step):
        client.receive_data(raw[i : i + step])
        events += events_until_need(client)
    assert events[0] == Reply(Op.NAR_FROM_PATH, None)
    assert b"".join(e.data for e in events if isinstance(e, Data)) == NAR2
    assert isinstance(events[-2], EndOfData)
    assert events[-1] == Reply(Op.QUERY_REFERRERS, [P2])


def test_nar_from_path_truncated_nar_is_an_error() -> None:
    client, server, _, _ = connected_pair(35, 35)
    client.send_request(Op.NAR_FROM_PATH, {"path": P1})
    server.send_reply(Op.NAR_FROM_PATH)
    server.send_raw(NAR1[:-8])
    pump(server, client)
    events_until_need(client)
    client.receive_data(b"")
    with pytest.raises(ProtocolError):
        client.next_event()


def _multiple_stream(entries: list[tuple[ValidPathInfo, bytes]]) -> bytes:
    out = encode_multiple_header(len(entries))
    for info, nar in entries:
        out += encode_multiple_entry(info) + nar
    return out


def _vpi(path: str, nar: bytes, **kw) -> ValidPathInfo:
    return ValidPathInfo(path, PathInfo(None, "ef" * 32, [], 0, len(nar), **kw))


def _parse_multiple(stream: bytes, step: int) -> list:
    parser = MultipleParser()
    events = []
    for i in range(0, len(stream), step):
        parser.receive_data(stream[i : i + step])
        while (ev := parser.next_event()) is not NEED_DATA:
            events.append(ev)
    parser.receive_data(b"")
    while (ev := parser.next_event()) is not NEED_DATA:
        events.append(ev)
        if isinstance(ev, EndOfData):
            break
    return events


@pytest.mark.parametrize("step", [1, 13, 100000])
def test_add_multiple_to_store_through_the_connection(step: int) -> None:
    entries = [
        (_vpi(P1, NAR1, sigs=["k:s"], ca="fixed:sha256:abc"), NAR1),
        (_vpi(P2, NAR2, ultimate=True), NAR2),
    ]
    stream = _multiple_stream(entries)
    client, server, _, _ = connected_pair(34, 35)
    client.send_request(Op.ADD_MULTIPLE_TO_STORE, {"repair": False, "dont_check_sigs": False})
    for i in range(0, len(stream), 999):
        client.send_data(stream[i : i + 999])
    client.send_end_of_data()
    pump(client, server)
    payload, others = _collect_stream(server)
    assert payload == stream and isinstance(others[-1], EndOfData)
    events = _parse_multiple(payload, step)
    starts = [e for e in events if isinstance(e, NarStart)]
    assert [s.info for s in starts] == [e[0] for e in entries]
    assert [(s.index, s.count) for s in starts] == [(0, 2), (1, 2)]
    assert sum(isinstance(e, NarEnd) for e in events) == 2
    assert isinstance(events[-1], EndOfData)
    nars, cur = [], b""
    for e in events:
        if isinstance(e, Data):
            cur += e.data
        elif isinstance(e, NarEnd):
            nars.append(cur)
            cur = b""
    assert nars == [NAR1, NAR2]


@pytest.mark.parametrize(
    "stream",
    [
        _multiple_stream([(_vpi(P1, NAR2 + b"x" * 8), NAR2)]),  # narSize too big
        _multiple_stream([(_vpi(P1, NAR2[:-8]), NAR2)]),  # narSize too small
        _multiple_stream([(_vpi(P1, NAR2), NAR2)]) + b"\0" * 8,  # trailing data
        _multiple_stream([(_vpi(P1, NAR2), NAR2)])[:-8],  # truncated
        encode_multiple_header(2) + encode_multiple_entry(_vpi(P1, NAR2)) + NAR2,
    ],
)
def test_add_multiple_to_store_bad_streams(stream: bytes) -> None:
    with pytest.raises(ProtocolError):
        _parse_multiple(stream, 64)


def test_add_build_log_framed() -> None:
    client, server, _, _ = connected_pair(35, 35)
    client.send_request(Op.ADD_BUILD_LOG, {"drv_base_name": "x.drv"})
    client.send_data(b"line 1\n")
    client.send_data(b"line 2\n")
    client.send_end_of_data()
    pump(client, server)
    data, others = _collect_stream(server)
    assert data == b"line 1\nline 2\n"
    assert others == [Request(Op.ADD_BUILD_LOG, {"drv_base_name": "x.drv"}), EndOfData()]


def test_partial_frames_are_streamed_not_buffered() -> None:
    client, server, _, _ = connected_pair(35, 35)
    client.send_request(Op.ADD_BUILD_LOG, {"drv_base_name": "x.drv"})
    client.send_data(b"z" * (1 << 20))
    raw = client.data_to_send()
    server.receive_data(raw[: len(raw) // 2])
    events = events_until_need(server)
    assert isinstance(events[0], Request)
    assert sum(len(e.data) for e in events[1:]) > (1 << 18)


def test_export_path_write_frames_reach_the_client() -> None:
    client, server, _, _ = connected_pair(35, 35)
    client.send_request(Op.EXPORT_PATH, {"path": P1, "sign": 0})
    pump(client, server)
    events_until_need(server)
    server.send_log(Write(b"abc"))
    server.send_reply(Op.EXPORT_PATH, 1)
    pump(server, client)
    assert events_until_need(client) == [Log(Write(b"abc")), Reply(Op.EXPORT_PATH, 1)]


@pytest.mark.parametrize("minor", [25, 26, 35])
def test_error_layout_by_minor(minor: int) -> None:
    client, server, _, _ = connected_pair(minor, 35)
    client.send_request(Op.ADD_TEMP_ROOT, {"path": P1})
    server.send_error("not allowed", status=3)
    raw = server.data_to_send()
    if minor >= 26:
        assert raw[8:24] == W.u64(5) + b"Error\0\0\0"
    else:
        assert raw.endswith(W.u64(3))
    client.receive_data(raw)
    (ev,) = events_until_need(client)
    assert isinstance(ev, ErrorReply) and ev.error.message == "not allowed"
    assert ev.error.status == (3 if minor < 26 else 1)


# ------------------------------------------------------------------ strictness


def _server(minor: int = 35) -> ServerConnection:
    _, server, _, _ = connected_pair(minor, 35)
    server.data_to_send()
    return server


def _path(text: str) -> bytes:
    return W.encode(W.STR, text, W.Ctx(35))


@pytest.mark.parametrize("op", [0, 2, 15, 17, 24, 25, 48, 999, 1002, 2**64 - 1])
def test_unknown_op_is_invalid_operation(op: int) -> None:
    server = _server()
    server.receive_data(W.u64(op))
    with pytest.raises(ProtocolError, match=f"invalid operation {op}") as info:
        server.next_event()
    assert info.value.offset is not None


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (W.u64(31) + W.u64(0) + W.u64(2), "boolean"),
        (W.u64(1) + W.u64(3) + b"abc\0\0\0\0\1", "padding"),
        (W.u64(1) + W.u64((64 << 20) + 1), "exceeds the limit"),
        (W.u64(31) + W.u64(1 << 40), "exceeds the limit"),
        (W.u64(45) + _path("x.drv") + W.u64(1 << 32), "frame"),
        (W.u64(1) + W.u64(3) + b"\xff\xfe\0\0\0\0\0\0", None),  # bytes kept (surrogateescape)
    ],
)
def test_strict_input(raw: bytes, match: str | None) -> None:
    server = _server()
    server.receive_data(raw)
    if match is None:
        ev = server.next_event()
        assert ev.args["path"].encode("utf-8", "surrogateescape") == b"\xff\xfe\0"
        return
    with pytest.raises(ProtocolError, match=match) as info:
        events_until_need(server)
    assert info.value.offset is not None and info.value.offset >= 8


def test_eof_inside_frames_and_at_boundaries() -> None:
    server = _server()
    server.receive_data(W.u64(45) + _path("x.drv") + W.u64(10) + b"abc")
    events_until_need(server)
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match="end of stream"):
        server.next_event()
    server = _server()
    server.receive_data(W.u64(13))
    assert server.next_event() == Request(Op.SYNC_WITH_GC, {})
    server.receive_data(b"")
    assert isinstance(server.next_event(), ConnectionClosed)


def test_receive_buffer_is_linear() -> None:
    buf = W.ReceiveBuffer()
    for i in range(20000):
        buf.feed(b"12345678")
        assert buf.take(8) == b"12345678"
        assert len(buf._buf) <= 16, i  # consumed prefix dropped, never re-copied wholesale
    assert buf.offset == 160000
