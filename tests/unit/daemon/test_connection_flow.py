"""Read backpressure of a session's client connection (recnix.daemon.session.ConnectionHandler):
a client that sends faster than the request's stream is consumed is stopped at the
socket, and read again once the handler has caught up; nothing it sent is lost."""

from __future__ import annotations

import asyncio
from typing import Any

from recnix.daemon.connection import READ_HIGH_WATER, READ_LOW_WATER, ConnectionHandler, Peer
from recnix.protocol import ClientConnection, Data, Op, Request, ServerConnection
from tests.unit.fakes import FakeSession, FakeStore
from tests.unit.protocol.test_support import connected_pair

CHUNK = b"x" * 65536


class FakeTransport:
    """What ConnectionHandler uses of its asyncio transport."""

    def __init__(self) -> None:
        self.reading_paused = False
        self.pauses = 0
        self.resumes = 0

    def pause_reading(self) -> None:
        assert not self.reading_paused, "paused twice"
        self.reading_paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        assert self.reading_paused, "resumed while reading"
        self.reading_paused = False
        self.resumes += 1

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        pass


def handler_after_handshake() -> tuple[ClientConnection, ServerConnection, FakeTransport, Any]:
    """A client, and a ConnectionHandler on a fake transport, past their handshake."""
    client, server, _, _ = connected_pair(35)
    session = FakeSession(FakeStore(), set())
    session.keeper = None  # type: ignore[attr-defined]
    transport = FakeTransport()
    handler = ConnectionHandler(session, transport, Peer(1, 0, 0))  # type: ignore[arg-type]
    handler.conn = server
    return client, server, transport, handler


def test_reading_pauses_above_the_high_mark_and_resumes_below_the_low_mark() -> None:
    client, server, transport, handler = handler_after_handshake()
    args = {"name": "big", "ca_method": "fixed:r:sha256", "references": [], "repair": False}
    client.send_request(Op.ADD_TO_STORE, args)
    sent = 0
    while sent <= READ_HIGH_WATER + len(CHUNK):
        client.send_data(CHUNK)
        sent += len(CHUNK)
    client.send_end_of_data()
    handler.on_data(client.data_to_send())
    assert transport.pauses == 1 and transport.reading_paused

    async def consume() -> tuple[int, int]:
        request = await handler.next_request_event()
        assert isinstance(request, Request) and request.op is Op.ADD_TO_STORE
        got = 0
        while transport.reading_paused:
            ev = await handler.next_event()
            assert isinstance(ev, Data)
            got += len(ev.data)
        assert server.buffered < READ_LOW_WATER
        at_resume = got
        async for chunk in handler.stream():  # the rest, still buffered
            got += len(chunk)
        return at_resume, got

    at_resume, got = asyncio.run(consume())
    assert transport.resumes == 1 and at_resume > sent - READ_LOW_WATER
    assert got == sent  # nothing lost


def test_small_requests_never_pause_reading() -> None:
    client, _, transport, handler = handler_after_handshake()
    for _ in range(100):
        client.send_request(Op.IS_VALID_PATH, {"path": "/nix/store/" + "a" * 32 + "-x"})
    handler.on_data(client.data_to_send())
    assert transport.pauses == 0
