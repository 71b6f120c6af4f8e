"""recnix.daemon.session: a session's keeper and input closure wait for its first client.

A session opens without a daemon worker of its own; ``Session.ready`` connects the
keeper (a fresh connection from the pool) and computes the input closure once, for
every client that waits for it, and again after a failure. A session that never got
a client ends without ever asking the pool.

The pool and the daemon here are in-memory (tests/unit/fakes.py); the host tier runs
real sessions (tests/host/test_session_protocol.py:
test_the_keeper_and_input_closure_wait_for_the_builds_first_client).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from recnix.daemon.session import EARLY_LIMIT, ClientProtocol, Session, SessionContext
from recnix.formats.derivation import Derivation
from recnix.store.upstream import UpstreamError
from tests.unit.fakes import LIMITS, FakeStore, store_path


class Keeper(FakeStore):
    """A daemon connection answering from the in-memory store."""

    closed = False

    async def close(self) -> None:
        self.closed = True


class Pool:
    """The fresh connections a session takes; the first ``failures`` fail."""

    def __init__(self, store: Keeper, failures: int = 0) -> None:
        self.store = store
        self.failures = failures
        self.asked = 0

    async def fresh(self) -> Keeper:
        self.asked += 1
        await asyncio.sleep(0.01)  # a handshake: other clients come meanwhile
        if self.failures:
            self.failures -= 1
            raise UpstreamError("cannot connect to the nix-daemon at /nowhere")
        return self.store

    async def drop(self, owner: str) -> None:
        pass


class NoAudit:
    def write(self, *args: object, **kwargs: object) -> None:
        pass


def session_with_inputs(tmp_path: Path, pool: Pool) -> tuple[Session, set[str]]:
    """A session whose build has one input source with one reference."""
    store = pool.store
    dep = store.put(store_path("dep"))
    src = store.put(store_path("src"), references=[dep])
    store.put(store_path("unrelated"))
    drv = Derivation({}, {}, [src], "x86_64-linux", "/bin/sh", [], {})
    chroot = tmp_path / "chroot"
    (chroot / "nix" / "store").mkdir(parents=True)
    context = SessionContext(
        tmp_path / "state",
        tmp_path / "roots",
        NoAudit(),
        False,
        False,
        pool,  # type: ignore[arg-type]
    )
    drv_path = store_path("outer.drv")
    session = Session(context, "s1", drv_path, drv, chroot, False, 1, None, LIMITS)
    return session, {src, dep}


def test_clients_that_come_together_share_one_keeper(tmp_path: Path) -> None:
    pool = Pool(Keeper())
    session, inputs = session_with_inputs(tmp_path, pool)
    assert session.keeper is None and not session.is_ready

    async def scenario() -> None:
        await asyncio.gather(*(session.ready() for _ in range(3)))
        await session.ready()

    asyncio.run(scenario())
    assert pool.asked == 1
    assert session.is_ready and session.keeper is pool.store
    assert session.inputs == inputs and session.allowed == inputs
    assert inputs <= session.view.known_present


def test_a_failed_keeper_connection_is_tried_again_by_the_next_client(tmp_path: Path) -> None:
    pool = Pool(Keeper(), failures=1)
    session, inputs = session_with_inputs(tmp_path, pool)

    async def scenario() -> None:
        with pytest.raises(UpstreamError, match="/nowhere"):
            await session.ready()
        assert not session.is_ready and session.allowed == set()
        await session.ready()

    asyncio.run(scenario())
    assert pool.asked == 2 and session.is_ready and session.allowed == inputs


def test_a_waiting_client_that_leaves_does_not_cancel_the_others(tmp_path: Path) -> None:
    pool = Pool(Keeper())
    session, inputs = session_with_inputs(tmp_path, pool)

    async def scenario() -> None:
        leaving = asyncio.ensure_future(session.ready())
        staying = asyncio.ensure_future(session.ready())
        await asyncio.sleep(0)
        leaving.cancel()
        await staying

    asyncio.run(scenario())
    assert pool.asked == 1 and session.is_ready and session.allowed == inputs


def test_a_session_without_clients_never_asks_for_a_keeper(tmp_path: Path) -> None:
    pool = Pool(Keeper())
    session, _ = session_with_inputs(tmp_path, pool)
    asyncio.run(session.let_go("finalised"))
    assert pool.asked == 0


def test_closing_while_the_session_gets_ready_closes_its_keeper(tmp_path: Path) -> None:
    class SlowKeeper(Keeper):
        async def query_path_info(self, path: str):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.01)
            return await super().query_path_info(path)

    pool = Pool(SlowKeeper())
    session, _ = session_with_inputs(tmp_path, pool)

    async def scenario() -> None:
        waiting = asyncio.ensure_future(session.ready())
        while session.keeper is None:  # connected; the input closure is being read
            await asyncio.sleep(0.001)
        await session.let_go("aborted")
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())
    assert pool.asked == 1 and pool.store.closed and not session.is_ready


class Transport:
    """What ClientProtocol does to its transport."""

    def __init__(self) -> None:
        self.reading = True
        self.closed = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True


class Handler:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def on_data(self, data: bytes) -> None:
        self.received.append(data)


class Accepting:
    sid = "s1"

    def accept(self, transport: Transport, protocol: ClientProtocol) -> None:
        transport.pause_reading()  # as Session.accept does before the session is ready


def test_what_a_client_sends_before_its_handler_exists_is_handed_over() -> None:
    """Some loops read once after pause_reading() in connection_made (uvloop, Python
    3.11.2's asyncio): those bytes, and an EOF, reach the handler in order."""
    protocol = ClientProtocol(Accepting())  # type: ignore[arg-type]
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(b"magic")
    protocol.data_received(b"version")
    assert protocol.eof_received() is True  # kept half open: the handler answers first
    assert not transport.reading and not transport.closed
    handler = Handler()
    protocol.attach(handler)  # type: ignore[arg-type]
    assert handler.received == [b"magic", b"version", b""] and transport.reading
    protocol.data_received(b"more")
    assert handler.received[-1] == b"more"


def test_a_client_that_floods_before_its_handshake_is_closed() -> None:
    protocol = ClientProtocol(Accepting())  # type: ignore[arg-type]
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(b"x" * EARLY_LIMIT)
    assert not transport.closed
    protocol.data_received(b"x")
    assert transport.closed and protocol.early == []
