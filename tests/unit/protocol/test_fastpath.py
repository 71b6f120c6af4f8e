"""ServerConnection's one-go decoding of single-path requests (IsValidPath,
QueryPathInfo, ...) gives exactly the events and errors of the general decoder."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recnix.protocol import Op, ProtocolError, Request, ServerConnection
from recnix.protocol import connection as C
from recnix.protocol import wire as W
from tests.unit.protocol.test_support import connected_pair, events_until_need

PATH = "/nix/store/" + "a" * 32 + "-hello-2.12"


def frame(op: int, payload: bytes, length: int | None = None, pad: bytes | None = None) -> bytes:
    n = len(payload) if length is None else length
    padding = b"\0" * ((-len(payload)) % 8) if pad is None else pad
    return struct.pack("<QQ", op, n) + payload + padding


def server(general: bool, monkeypatch: pytest.MonkeyPatch | None = None) -> ServerConnection:
    _, srv, _, _ = connected_pair(35)
    if general:  # the general decoder only
        srv._single_path_request = lambda: None  # type: ignore[method-assign]
    return srv


def outcome(srv: ServerConnection, data: bytes, step: int) -> list:
    """Events (or the error) from feeding ``data`` ``step`` bytes at a time, then EOF."""
    events: list = []
    try:
        for i in range(0, len(data), step):
            srv.receive_data(data[i : i + step])
            events += events_until_need(srv)
        srv.receive_data(b"")
        events += events_until_need(srv)
    except ProtocolError as e:
        events.append(("error", str(e), e.offset))
    return events


def test_the_hot_ops_take_the_fast_path() -> None:
    ops = set(C.SINGLE_PATH_OPS)
    assert {Op.QUERY_PATH_INFO, Op.IS_VALID_PATH} <= ops
    # ops with other fields or a trailing stream never do
    assert not ops & {Op.ADD_TO_STORE, Op.QUERY_VALID_PATHS, Op.ADD_TEXT_TO_STORE}
    srv = server(general=False)
    calls = []
    real = srv._single_path_request

    def spy():  # noqa: ANN202
        calls.append(1)
        return real()

    srv._single_path_request = spy  # type: ignore[method-assign]
    srv.receive_data(frame(Op.QUERY_PATH_INFO, PATH.encode()))
    assert events_until_need(srv) == [Request(Op.QUERY_PATH_INFO, {"path": PATH})]
    assert calls


CASES = {
    "good": frame(Op.QUERY_PATH_INFO, PATH.encode()),
    "two pipelined": frame(Op.IS_VALID_PATH, PATH.encode()) + frame(Op.QUERY_PATH_INFO, b"x"),
    "empty path": frame(Op.IS_VALID_PATH, b""),
    "8-byte path": frame(Op.IS_VALID_PATH, b"12345678"),
    "non-zero padding": frame(Op.QUERY_PATH_INFO, b"abc", pad=b"\0\0\0\0\1"),
    "too long": frame(Op.QUERY_PATH_INFO, b"", length=W.MAX_STRING_LEN + 1, pad=b""),
    "truncated": frame(Op.QUERY_PATH_INFO, PATH.encode())[:-3],
    "not utf-8": frame(Op.QUERY_PATH_INFO, b"/nix/store/\xff\xfe"),
    "unknown op": frame(12345, PATH.encode()),
    "other op": frame(Op.QUERY_VALID_PATHS, b"")[:8]
    + struct.pack("<QQ", 1, 5)
    + b"abcde\0\0\0"
    + b"\0" * 8,
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("step", [1, 7, 16, 1 << 20])
def test_same_as_the_general_decoder(name: str, step: int) -> None:
    data = CASES[name]
    assert outcome(server(False), data, step) == outcome(server(True), data, step)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(sorted(C.SINGLE_PATH_OPS) + [Op.QUERY_VALID_PATHS, 99]),
    payload=st.binary(max_size=40),
    pad=st.one_of(st.none(), st.binary(max_size=9)),
    length=st.one_of(st.none(), st.integers(0, 64)),
    step=st.integers(1, 80),
)
def test_same_as_the_general_decoder_on_anything(
    op: int, payload: bytes, pad: bytes | None, length: int | None, step: int
) -> None:
    data = frame(op, payload, length, pad) + frame(Op.IS_VALID_PATH, PATH.encode())
    assert outcome(server(False), data, step) == outcome(server(True), data, step)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(sorted(C.SINGLE_PATH_OPS) + [Op.QUERY_VALID_PATHS, 99]),
    payload=st.binary(max_size=40),
    pad=st.one_of(st.none(), st.binary(max_size=9)),
    length=st.one_of(st.none(), st.integers(0, 64)),
    extra=st.binary(max_size=20),
)
def test_one_whole_request_in_one_go(
    op: int, payload: bytes, pad: bytes | None, length: int | None, extra: bytes
) -> None:
    """receive_single_path_request(data) is receive_data(data) + next_event() when it
    answers, and consumes nothing when it does not."""
    data = frame(op, payload, length, pad) + extra
    fast, general = server(False), server(True)
    request = fast.receive_single_path_request(data)
    if request is None:
        assert fast._buf.offset == general._buf.offset and not len(fast._buf)
        assert outcome(fast, data, len(data)) == outcome(general, data, len(data))
        return
    general.receive_data(data)
    assert events_until_need(general) == [request]
    assert fast._buf.offset == general._buf.offset
    assert outcome(fast, PATH.encode(), 3) == outcome(general, PATH.encode(), 3)


def test_one_whole_request_only_between_requests() -> None:
    good = frame(Op.QUERY_PATH_INFO, PATH.encode())
    srv = server(False)
    assert srv.receive_single_path_request(good) == Request(Op.QUERY_PATH_INFO, {"path": PATH})
    srv.receive_data(good[:5])  # a request under way: the next bytes are not a new one
    assert srv.receive_single_path_request(good) is None
    _, srv, _, _ = connected_pair(35)
    srv.receive_data(b"")
    assert srv.receive_single_path_request(good) is None  # after EOF
