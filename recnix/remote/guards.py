"""Builds that reach this machine without their ``.drv`` (Nix's distributed builds).

A client that dispatches a build to this machine through Nix's
``BuildDerivation`` (every ``ssh://`` builder; ``ssh-ng://`` with a client the
builder trusts; always so in Nix 2.8), unless the client's ``build-hook`` is
``recnix-build-hook`` (recnix.remote.sshproxy sends the ``.drv`` over ``ssh-ng://``
first), sends only the derivation's
``BasicDerivation`` over the wire: the ``.drv`` file is not in this store
(Nix #9272), and Nix tells the pre-build hook only its path. recnix cannot
learn whether such a build requires ``recnix``, so it cannot open a session
for it, and running an opted-in build without its session would let it fail
in obscure ways (or, worse, build something else than it asked for).

So the pre-build hook asks for a *guard* instead: a socket that the sandbox
sees where a session's socket would be, answering every worker-protocol
request with an error that names the cause and the fix. A build that did not
opt in never connects to it; an opted-in one fails at its first Nix call with
that message in its log. The guard ends when the build's chroot is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
from pathlib import Path

from recnix.protocol import NOT_TRUSTED, ProtocolError
from recnix.protocol.connection import Request, ServerConnection
from recnix.sandbox.connlimit import ConnectionLimit
from recnix.store.aio import next_event, serve_requests

log = logging.getLogger(__name__)

GUARD_PREFIX = "g-"
SWEEP_INTERVAL = 5.0


def absent_drv_message(drv_path: str, host: str | None = None) -> str:
    """The error an opted-in build without its ``.drv`` gets at its first Nix call."""
    host = host or os.uname().nodename
    return (
        f"recnix on {host}: {drv_path} was sent to this machine without its .drv "
        "(a remote build through Nix's BuildDerivation operation: every ssh:// builder, "
        "and ssh-ng:// from a client this builder trusts, or any Nix 2.8 client), so "
        "recnix cannot tell that it requires the system feature recnix and has no session "
        "for it. Fixes: on the client, set nix.conf `build-hook = recnix-build-hook` "
        "(`recnix nix-conf` prints the line; the NixOS module sets it; Nix 2.25-2.33 ignore "
        "it: put recnix's sshshim directory first on nix-daemon's PATH) and reach this "
        "builder over ssh-ng:// (recnix's ssh proxy then sends the .drv first and brings "
        "the whole closure back); or copy the .drv here before building (`nix copy "
        "--derivation --to ssh-ng://<builder> <drv>`; Nix then copies back only the "
        "outputs); or build it where recnix runs locally (drop recnix from this machine's "
        "features in the client's nix.conf `builders`, nix.buildMachines.*.supportedFeatures "
        "on NixOS). With a client on Nix >= 2.16, ssh-ng:// as a user that is not in this "
        "machine's nix.conf `trusted-users` sends the .drv too. See recnix's README, "
        "'Distributed builds'."
    )


class Guard:
    """One guard socket: ``<state dir>/g-<n>/socket``, for one build."""

    def __init__(
        self,
        directory: Path,
        drv_path: str,
        chroot: Path,
        max_connections: int,
    ) -> None:
        self.directory = directory
        self.socket_path = directory / "socket"
        self.drv_path = drv_path
        self.chroot = chroot
        self.message = absent_drv_message(drv_path)
        self.limit = ConnectionLimit(max_connections)  # open at once
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.directory.mkdir(mode=0o711, parents=True, exist_ok=False)
        os.chmod(self.directory, 0o711)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o666)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handshake, then answer the first request with the error, then close."""
        if not self.limit.take():
            if self.limit.refusal_worth_logging:
                log.warning(
                    "guard for %s: closed a connection: %s",
                    self.drv_path,
                    self.limit.describe_refusals(),
                )
            writer.close()
            return
        log.warning("guard for %s: refused a Nix call: its .drv is not here", self.drv_path)
        conn = ServerConnection(trust=NOT_TRUSTED)

        async def flush() -> None:
            writer.write(conn.data_to_send())
            await writer.drain()

        async def answer(ev: object) -> bool:
            if isinstance(ev, Request):
                conn.send_error(self.message)
                await flush()
                return False  # one answer, then the connection is closed
            return True

        try:
            await serve_requests(lambda: next_event(conn, reader, flush), answer, flush)
        except (ProtocolError, ConnectionError, OSError) as e:
            log.info("guard for %s: connection ended: %s", self.drv_path, e)
        finally:
            self.limit.give_back()
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        shutil.rmtree(self.directory, ignore_errors=True)


class Guards:
    """The service's guards; a sweeper ends those whose chroot is gone."""

    def __init__(self, state_dir: Path, max_connections: int, audit: object | None = None) -> None:
        self.state_dir = state_dir
        self.audit = audit
        # of each guard at once: a session's policy.max-connections-per-session
        self.max_connections = max_connections
        self.guards: dict[str, Guard] = {}
        self._ids = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self, drv_path: str, chroot: Path) -> Guard:
        """A guard socket for the build of ``drv_path`` whose sandbox is ``chroot``."""
        gid = f"{os.getpid()}-{next(self._ids)}"
        guard = Guard(
            self.state_dir / f"{GUARD_PREFIX}{gid}", drv_path, chroot, self.max_connections
        )
        await guard.start()
        self.guards[gid] = guard
        write = getattr(self.audit, "write", None)
        if write is not None:
            write("guarded", gid, drv=drv_path, reason="no .drv in this store (BuildDerivation)")
        log.info("guard %s for %s (no .drv in this store: a remote build)", gid, drv_path)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep_loop())
        return guard

    async def sweep(self) -> None:
        """Close the guards whose build is over (its chroot was removed)."""
        for gid, guard in list(self.guards.items()):
            if not guard.chroot.exists():
                del self.guards[gid]
                await guard.close()

    async def _sweep_loop(self) -> None:
        while self.guards:
            await asyncio.sleep(SWEEP_INTERVAL)
            await self.sweep()

    def remove_stale(self) -> None:
        """Guard directories of an earlier run of the service."""
        live = {g.directory for g in self.guards.values()}
        for stale in self.state_dir.glob(f"{GUARD_PREFIX}*"):
            if stale not in live:
                shutil.rmtree(stale, ignore_errors=True)

    async def close(self) -> None:
        for guard in self.guards.values():
            await guard.close()
        self.guards.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()


# -- builds this machine dispatched through recnix's build hook ------------------------

REMOTE_MARKS = "remote-built"


def mark_remote_build(state_dir: Path, drv_path: str) -> None:
    """Note that ``drv_path`` (opted in) was built on a remote builder, its closure copied
    here by recnix's ssh proxy: the post-build hook Nix runs for it here finds no session."""
    marks = state_dir / REMOTE_MARKS
    marks.mkdir(mode=0o700, parents=True, exist_ok=True)
    (marks / Path(drv_path).name).touch()


def take_remote_mark(state_dir: Path, drv_path: str) -> bool:
    """Whether ``drv_path`` was marked by :func:`mark_remote_build` (the mark is removed)."""
    try:
        (state_dir / REMOTE_MARKS / Path(drv_path).name).unlink()
    except OSError:
        return False
    return True
