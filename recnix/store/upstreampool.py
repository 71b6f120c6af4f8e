"""Connections to the real nix-daemon for the service: new ones, and fresh ones kept ready.

A *fresh* connection is one whose daemon worker has answered nothing yet, so it
holds no cached path info from before a re-registration: each session's keeper
and each of finalisation's path-info queries needs one. A few are kept ready
(``SPARE_UPSTREAMS``), which takes a daemon fork and handshake off the critical
path of opening and finalising a session.
"""

from __future__ import annotations

import asyncio
import logging

from recnix.store.upstream import Upstream, UpstreamError

log = logging.getLogger("recnix.store.upstreampool")

SPARE_UPSTREAMS = 2  # fresh connections kept ready


class UpstreamPool:
    """New and fresh connections to the nix-daemon at ``address`` (``daemon.upstream``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._spares: list[Upstream] = []
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

    async def _fill_spares(self) -> None:
        while len(self._spares) < SPARE_UPSTREAMS and not self._closed:
            try:
                self._spares.append(await self.connect())
            except (UpstreamError, OSError) as e:
                log.debug("cannot open a spare nix-daemon connection: %s", e)
                return

    async def close(self) -> None:
        """Close the spares and stop refilling them."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
        for spare in self._spares:
            await spare.close()
        self._spares.clear()
