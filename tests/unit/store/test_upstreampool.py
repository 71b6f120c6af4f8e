"""recnix.store.upstreampool's leases: a session's idle connections serve only that
session, out-of-sync ones are closed, an ended session's are closed (the host tier
runs the pool against real nix-daemons: tests/host/test_session_protocol.py)."""

from __future__ import annotations

import asyncio

from recnix.store.upstreampool import IDLE_PER_OWNER, UpstreamPool


class FakeUpstream:
    """What the pool looks at of a connection."""

    def __init__(self, hooks: bool) -> None:
        self.runs_hooks = hooks
        self.reusable = True
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class CountingPool(UpstreamPool):
    def __init__(self) -> None:
        super().__init__("unix:///nonexistent")
        self.made: list[FakeUpstream] = []

    async def connect(self, hooks: bool = True) -> FakeUpstream:  # type: ignore[override]
        up = FakeUpstream(hooks)
        self.made.append(up)
        return up


def run(coro):
    return asyncio.run(coro)


def test_a_connection_given_back_serves_its_session_again_and_no_other() -> None:
    async def scenario() -> None:
        pool = CountingPool()
        up = await pool.lease("a", hooks=False)
        await pool.give_back("a", up)
        assert await pool.lease("b", hooks=False) is not up  # another session: a new one
        assert await pool.lease("a", hooks=True) is not up  # builds with hooks: another kind
        assert await pool.lease("a", hooks=False) is up
        assert len(pool.made) == 3

    run(scenario())


def test_out_of_sync_or_unwanted_connections_are_closed_not_kept() -> None:
    async def scenario() -> None:
        pool = CountingPool()
        stale = await pool.lease("a", hooks=False)
        stale.reusable = False  # a request was cut short: the worker is out of sync
        await pool.give_back("a", stale)
        assert stale.closed
        ending = await pool.lease("a", hooks=False)
        await pool.give_back("a", ending, keep=False)  # the session is finalising
        assert ending.closed
        assert await pool.lease("a", hooks=False) not in (stale, ending)

    run(scenario())


def test_a_session_keeps_a_bounded_number_idle_and_drop_closes_them() -> None:
    async def scenario() -> None:
        pool = CountingPool()
        ups = [await pool.lease("a", hooks=True) for _ in range(IDLE_PER_OWNER + 2)]
        for up in ups:
            await pool.give_back("a", up)
        assert sum(up.closed for up in ups) == 2
        await pool.drop("a")
        assert all(up.closed for up in ups)
        late = await pool.lease("a", hooks=True)
        assert late not in ups
        await pool.give_back("a", late, keep=False)  # the ended session's last client
        assert late.closed and not pool._idle  # noqa: SLF001 - nothing left of "a"

    run(scenario())


def test_closing_the_pool_closes_every_idle_connection_and_keeps_none_after() -> None:
    async def scenario() -> None:
        pool = CountingPool()
        a, b = await pool.lease("a", hooks=True), await pool.lease("b", hooks=False)
        await pool.give_back("a", a)
        await pool.give_back("b", b)
        await pool.close()
        assert a.closed and b.closed
        late = await pool.lease("c", hooks=True)
        await pool.give_back("c", late)
        assert late.closed

    run(scenario())


def test_reachable_costs_nothing_while_a_spare_is_ready_and_keeps_what_it_made() -> None:
    """A session's open asks whether the daemon can be reached (its keeper connects only
    with the build's first client): a ready spare answers; else the connection made to
    find out is kept as a spare, which the session's keeper then takes."""

    async def scenario() -> None:
        pool = CountingPool()
        await pool.reachable()
        assert len(pool.made) == 1
        await pool.reachable()
        assert len(pool.made) == 1  # the spare it made answers
        assert await pool.fresh() is pool.made[0]
        await pool.close()

    run(scenario())


def test_reachable_raises_the_connection_error() -> None:
    class NoDaemon(UpstreamPool):
        async def connect(self, hooks: bool = True):  # type: ignore[no-untyped-def,override]
            raise OSError(2, "cannot connect to the nix-daemon at /nowhere")

    async def scenario() -> None:
        try:
            await NoDaemon("unix:///nowhere").reachable()
        except OSError as e:
            assert "/nowhere" in str(e)
        else:
            raise AssertionError("reachable() did not raise")

    run(scenario())


def test_closing_the_pool_closes_the_spares_its_refill_made() -> None:
    """A fresh connection taken starts the spares' refill; closing the pool (the
    service stops, a test ends) closes what the refill made, not the caller's."""

    async def scenario() -> None:
        pool = CountingPool()
        first = await pool.fresh()  # no spare yet: a new one, and the refill starts
        await asyncio.sleep(0.1)  # the refill has made its spares
        assert len(pool.made) == 3 and all(not up.closed for up in pool.made)
        await pool.close()
        assert [up.closed for up in pool.made] == [False, True, True]  # the caller's stays
        await first.close()

    run(scenario())


def test_a_connection_whose_handshake_is_cancelled_is_closed(tmp_path) -> None:
    """Upstream.connect cancelled (or failing) after the socket connected, before the
    handshake ended: the daemon sees the connection closed, no worker is left serving
    it (a Lix worker would outlive the test)."""
    from recnix.store.upstream import Upstream

    async def scenario() -> None:
        closed = asyncio.Event()

        async def silent_daemon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            while await reader.read(4096):  # never answers the handshake
                pass
            closed.set()
            writer.close()

        server = await asyncio.start_unix_server(silent_daemon, path=str(tmp_path / "d.sock"))
        connecting = asyncio.ensure_future(Upstream.connect(f"unix://{tmp_path}/d.sock"))
        await asyncio.sleep(0.2)
        connecting.cancel()
        await asyncio.wait_for(closed.wait(), 5)
        server.close()

    run(scenario())
