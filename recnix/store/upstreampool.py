"""Connections to the real nix-daemon for the service: new ones, fresh ones kept ready,
and the idle ones of each session.

A *fresh* connection is one whose daemon worker has answered nothing yet, so it
holds no cached path info from before a re-registration: each session's keeper
and each of finalisation's path-info queries needs one. A few are kept ready
(``SPARE_UPSTREAMS``), which takes a daemon fork and handshake off the critical
path of opening and finalising a session; they are refilled a moment after one is
taken (``SPARE_REFILL_DELAY``), once the hook that waits for the open or the
finalisation has its answer, not while the daemon's fork competes with it for
the CPU.

A session's client connections *lease* connections and give them back when the
client is done; the pool keeps a few idle for that session (``IDLE_PER_OWNER``)
and never hands them to another (a worker may have cached path infos of the
session's own paths, which finalisation re-registers). Reuse saves a nix-daemon
worker fork and handshake per in-sandbox client (a nested `nix-build` opens
several connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from recnix.store.upstream import Upstream, UpstreamError

log = logging.getLogger("recnix.store.upstreampool")

SPARE_UPSTREAMS = 2  # fresh connections kept ready
# seconds from taking a spare to refilling the spares: an open or a finalisation that
# took one has usually answered its hook by then (measured: ~1 ms less per hook)
SPARE_REFILL_DELAY = 0.015
IDLE_PER_OWNER = 4  # idle connections kept for each session, of each kind (hooks or not)


class UpstreamPool:
    """New and fresh connections to the nix-daemon at ``address`` (``daemon.upstream``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._spares: list[Upstream] = []
        # (owner, whether builds on it run nix.conf's hooks) -> its idle connections
        self._idle: dict[tuple[str, bool], list[Upstream]] = {}
        self._filling: asyncio.Task[None] | None = None
        self._closed = False

    async def connect(self, hooks: bool = True) -> Upstream:
        """A new connection; ``hooks=False``: builds on it skip nix.conf's pre- and
        post-build hooks."""
        return await Upstream.connect(self.address, hooks=hooks)

    async def fresh(self) -> Upstream:
        """A connection whose daemon worker has answered nothing yet: a spare if one is
        ready (and the spares are refilled in the background), else a new one."""
        up = None
        while self._spares and up is None:
            spare = self._spares.pop(0)
            if spare.reusable:
                up = spare
            else:
                await spare.close()
        if not self._closed and (self._filling is None or self._filling.done()):
            self._filling = asyncio.ensure_future(self._fill_spares())
        return up or await self.connect()

    async def reachable(self) -> None:
        """Raise the connection's error (UpstreamError, OSError) if the nix-daemon cannot
        be reached. A ready spare says it can, at no cost; else a new connection is made
        and kept as a spare."""
        if any(spare.reusable for spare in self._spares):
            return
        up = await self.connect()
        if self._closed:
            await up.close()
        else:
            self._spares.append(up)

    async def lease(self, owner: str, hooks: bool) -> Upstream:
        """A connection for ``owner`` (a session id): one it gave back, else a new one
        (``hooks``: see :meth:`connect`)."""
        idle = self._idle.get((owner, hooks), [])
        while idle:
            up = idle.pop()
            if up.reusable:
                return up
            await up.close()
        return await self.connect(hooks=hooks)

    async def give_back(self, owner: str, up: Upstream, keep: bool = True) -> None:
        """``owner`` is done with ``up``: kept idle for it (``keep``, the connection in
        sync, fewer than IDLE_PER_OWNER idle), else closed."""
        if keep and up.reusable and not self._closed:
            # only a connection kept makes an entry: an ended owner's give-backs
            # (keep=False) must not leave one behind after drop()
            idle = self._idle.setdefault((owner, up.runs_hooks), [])
            if len(idle) < IDLE_PER_OWNER:
                idle.append(up)
                return
        await up.close()

    async def drop(self, owner: str) -> None:
        """Close the idle connections of ``owner`` (it ends)."""
        for hooks in (True, False):
            for up in self._idle.pop((owner, hooks), []):
                await up.close()

    async def _fill_spares(self) -> None:
        await asyncio.sleep(SPARE_REFILL_DELAY)
        while len(self._spares) < SPARE_UPSTREAMS and not self._closed:
            try:
                up = await self.connect()
            except (UpstreamError, OSError) as e:
                log.debug("cannot open a spare nix-daemon connection: %s", e)
                return
            if self._closed:
                await up.close()
                return
            self._spares.append(up)

    async def close(self) -> None:
        """Close the spares and the idle connections; stop refilling the spares."""
        self._closed = True
        if self._filling is not None:
            # a spare being connected is closed by Upstream.connect when cancelled
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filling
        for spare in self._spares:
            await spare.close()
        self._spares.clear()
        for owner, _ in list(self._idle):
            await self.drop(owner)
