"""The asyncio side of the sans-IO codec: feed a connection from a stream reader, and
the one server loop every worker-protocol server in recnix runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from recnix.protocol import NEED_DATA, ConnectionClosed, Data, EndOfData
from recnix.protocol.connection import ClientConnection, Event, ServerConnection

READ_CHUNK = 1 << 16


async def next_event(
    conn: ClientConnection | ServerConnection,
    reader: asyncio.StreamReader,
    flush: Callable[[], Awaitable[None]],
) -> Event:
    """The connection's next event, reading more input as needed.

    Queued output (e.g. handshake replies) is flushed before every read. At end
    of input the codec's verdict is returned: ``ConnectionClosed``, a last
    event, or ``NEED_DATA`` if the peer left in the middle of a message.
    """
    while True:
        ev = conn.next_event()
        if ev is not NEED_DATA:
            return ev
        await flush()
        data = await reader.read(READ_CHUNK)
        conn.receive_data(data)
        if not data:
            return conn.next_event()


async def serve_requests(
    next_event: Callable[[], Awaitable[Any]],
    answer: Callable[[Any], Awaitable[bool | None]],
    flush: Callable[[], Awaitable[None]],
) -> Any:
    """The server loop of a worker-protocol connection: a session's client
    (recnix.daemon.connection), a guard's (recnix.remote.guards), build-remote through
    the ssh proxy (recnix.remote.sshproxy).

    Each event at a request boundary from ``next_event`` (the handshake, then requests)
    goes to ``answer``, and what it queued is flushed after it. The loop ends when the
    client leaves, returning the ``ConnectionClosed`` (or ``NEED_DATA``: end of input
    inside a message), or when ``answer`` returns False (None then). Errors pass
    through: each server says what they mean for its peer."""
    while True:
        ev = await next_event()
        if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
            return ev
        if await answer(ev) is False:
            return None
        await flush()


async def stream_data(
    next_event: Callable[[], Awaitable[Event]], unexpected: type[Exception]
) -> AsyncIterator[bytes]:
    """The payload of ``Data`` events up to ``EndOfData`` (anything else raises ``unexpected``)."""
    while True:
        ev = await next_event()
        if isinstance(ev, Data):
            yield ev.data
        elif isinstance(ev, EndOfData):
            return
        else:
            raise unexpected(f"unexpected {type(ev).__name__} inside a data stream")


LOOP_ENV = "RECNIX_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The service's event loop: uvloop's when it is installed (the optional ``fast``
    dependency), else asyncio's (None). ``RECNIX_EVENT_LOOP=asyncio`` forces asyncio's;
    ``=uvloop`` requires uvloop."""
    import os

    wanted = os.environ.get(LOOP_ENV, "")
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if wanted == "uvloop":
            raise RuntimeError(f"{LOOP_ENV}=uvloop but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop
