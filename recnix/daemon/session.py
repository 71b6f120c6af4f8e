"""One opted-in build's session: its state and its socket.

A :class:`Session` holds the build's state: its allowed set (closure of its
inputs ∪ what it added or built), its sandbox, its socket, its keeper connection
to the nix-daemon. Every path that becomes allowed is rooted on the keeper and made
visible inside the sandbox before the reply goes out. It checks that each client of
its socket is the build's (``accept``) and has a
:class:`~recnix.daemon.connection.ConnectionHandler` serve it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recnix.daemon.audit import AuditLog
from recnix.daemon.connection import ConnectionHandler, Peer, peer_credentials
from recnix.daemon.journal import SessionJournal, SessionRecord
from recnix.formats.derivation import Derivation
from recnix.protocol import (
    PathInfo,
)
from recnix.sandbox.connlimit import ConnectionLimit
from recnix.sandbox.materialise import MaterialiseError, SandboxView
from recnix.sandbox.sandboxproc import SandboxProcess
from recnix.store.durable import fsync_paths
from recnix.store.gcroots import SessionRoots
from recnix.store.policy import Limits, drv_closure
from recnix.store.register import FinaliseError, Registrar
from recnix.store.restricted import censored_closure
from recnix.store.upstream import Upstream
from recnix.store.upstreampool import UpstreamPool

log = logging.getLogger("recnix.daemon.session")

# bytes a client may send before the session is ready to serve it (its handshake is a few)
EARLY_LIMIT = 64 * 1024


class ResumeError(Exception):
    """A journaled session cannot be resumed (the message says why)."""


class SessionState(enum.StrEnum):
    """Where a session is in its life; changed only by Session's own methods."""

    STARTING = "starting"  # opening or resuming: no client served yet
    OPEN = "open"  # serving the build's clients
    FINALISING = "finalising"  # the build ended; its outputs are being finalised
    CLOSED = "closed"  # disconnected (ended, or detached because the service stops)


@dataclass(frozen=True)
class SessionContext:
    """What every session gets from the service that opened it: where its files go,
    the settings it obeys, the audit log, and how it reaches the real nix-daemon.
    (A session never sees the service itself.)"""

    state_dir: Path  # daemon.state-dir: the session's socket directory and journal
    gc_roots_dir: Path  # daemon.gc-roots-dir: its GC roots
    audit: AuditLog
    fsync_paths: bool  # fsync what it adds or builds before the build sees it
    hooks_optional: bool  # nested builds that open no session may skip nix.conf's hooks
    upstreams: UpstreamPool  # its connections to the real nix-daemon


class Session:
    """State of one opted-in build: its allowed set, its sandbox, its socket."""

    def __init__(
        self,
        context: SessionContext,
        sid: str,
        drv_path: str,
        drv: Derivation,
        chroot: Path,
        readonly: bool,
        depth: int,
        parent: Session | None,
        limits: Limits,
        worker: int | None = None,
        holds_slot: bool = False,
    ) -> None:
        self.context = context
        self.sid = sid
        self.drv_path = drv_path
        self.drv = drv
        self.chroot = chroot
        self.readonly = readonly
        self.depth = depth
        self.parent = parent
        self.limits = limits
        self.inputs: set[str] = set()
        self.allowed: set[str] = set()
        self.added: set[str] = set()
        self.realisations: set[str] = set()
        self.builds = 0
        # .drv paths this session asked the daemon to build (a recnix build among
        # them, or among their dependencies, is a child of this session)
        self.build_requests: set[str] = set()
        self._requested_closure: frozenset[str] | None = None
        self.added_bytes = 0
        self.view = SandboxView(chroot)
        # the session's own daemon connection: roots what it adds or builds; connected,
        # and the input closure computed, when the build's first client comes (ready)
        self.keeper: Upstream | None = None
        self._ready: asyncio.Future[None] | None = None
        self.socket_dir = context.state_dir / f"s-{sid}"
        self.socket_path = self.socket_dir / "socket"
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task] = set()
        self.state = SessionState.STARTING
        self.ended_since: float | None = None
        self.seen_process = False  # a process was seen in the sandbox (the build started)
        self.holds_slot = holds_slot  # counts against daemon.max-sessions
        self.worker = worker  # pid of the Nix process whose pre-build hook opened it
        self.opened_at: float | None = None  # when the service opened or resumed it (time.time)
        self._allow_lock = asyncio.Lock()
        # Censored infos of paths met by closure(): valid, rooted paths whose infos no longer
        # change (nested outputs are final once their post-build hook ran), so QueryPathInfo
        # of an allowed path needs no upstream round trip.
        self.path_infos: dict[str, PathInfo] = {}
        # the connections being served now (policy.max-connections-per-session)
        self.connection_limit = ConnectionLimit(limits.max_connections)
        self.journal: SessionJournal | None = None  # lets a restarted service resume it
        # what it added or built, rooted also while the service restarts
        self.roots = SessionRoots(context.gc_roots_dir, sid)
        self.registrar: Registrar | None = None  # finalisation's nix-store, started early
        # parsed .drv files (store paths do not change) and the derivations known to pass
        # rule 1 of recnix.store.policy (it depends only on the allowed set, which only grows)
        self.drv_cache: dict[str, Derivation | None] = {}
        self.sound_drvs: set[str] = set()

    # -- lifecycle

    @property
    def ancestry(self) -> set[str]:
        """Derivations of this session and every session above it (never buildable here)."""
        drvs = {self.drv_path}
        if self.parent is not None:
            drvs |= self.parent.ancestry
        return drvs

    async def start(self) -> None:
        """Listen on the session socket. The keeper and the input closure wait for the
        build's first client (:meth:`ready`): a build that never calls Nix costs the
        nix-daemon no worker. An unreachable nix-daemon fails the open, which names it."""
        await self.context.upstreams.reachable()
        # The sandbox gets the directory (0711: the builder may open the socket by
        # name, not list or write), so a restarted service's new socket shows there.
        self.socket_dir.mkdir(mode=0o711, parents=True, exist_ok=False)
        os.chmod(self.socket_dir, 0o711)
        await self._listen()
        self.journal = SessionJournal.create(self.context.state_dir, self.record())
        self.state = SessionState.OPEN
        self.opened_at = time.time()

    @property
    def is_ready(self) -> bool:
        """Whether the keeper is connected and the input closure known."""
        f = self._ready
        return f is not None and f.done() and not f.cancelled() and f.exception() is None

    async def ready(self) -> None:
        """Connect the keeper and compute the input closure, once, for every client that
        waits for it; after a failure (StoreError, OSError) the next client tries again."""
        f = self._ready
        if f is None or (f.done() and not self.is_ready):
            self._ready = f = asyncio.ensure_future(self._get_ready())
        await asyncio.shield(f)

    async def _get_ready(self) -> None:
        started = time.perf_counter()
        await self._connect_keeper()
        inputs = await self._input_closure()
        self.inputs = inputs
        self.allowed |= inputs
        self.view.known_present |= inputs
        log.debug(
            "session %s: keeper connected, %d input paths, in %.1f ms",
            self.sid,
            len(inputs),
            1e3 * (time.perf_counter() - started),
        )

    async def _connect_keeper(self) -> Upstream:
        """The keeper, connected now (a fresh worker) if it is not yet."""
        if self.keeper is None:
            self.keeper = await self.context.upstreams.fresh()
        return self.keeper

    async def valid_outputs(self) -> bool:
        """Whether every output of the build is valid in the host store (asked on the
        keeper, which connects now if no client came)."""
        outputs = [o.path for o in self.drv.outputs.values() if o.path]
        if not outputs:
            return False
        keeper = await self._connect_keeper()
        if keeper.closed:
            return False
        return len(await keeper.query_valid_paths(outputs)) == len(outputs)

    async def resume(self, record: SessionRecord) -> None:
        """Take over a session a previous run of the service journaled (``record``).

        Re-roots what the session added or built (ResumeError if any of it is gone),
        and listens again on the same socket path, which the sandbox sees through its
        bind-mounted directory.
        """
        self.keeper = await self.context.upstreams.connect()
        self._ready = asyncio.get_running_loop().create_future()
        self._ready.set_result(None)
        self.inputs = await self._input_closure()
        ours = sorted(record.allowed - self.inputs)
        valid = set(await self.keeper.query_valid_paths(ours)) if ours else set()
        if len(valid) != len(ours):
            missing = sorted(set(ours) - valid)
            raise ResumeError(
                f"{len(missing)} path(s) it added or built are no longer valid "
                f"(e.g. {missing[0]}): garbage-collected while recnix was not running"
            )
        for path in ours:
            await self.keeper.add_temp_root(path)
        self.roots.add(ours)
        await self._closure(ours, known=self.inputs)  # their path infos, for the fast path
        self.allowed = self.inputs | set(ours)
        self.added = set(ours)
        self.view = SandboxView(self.chroot, known_present=self.inputs)
        self.view.materialised = dict(record.materialised)
        self.build_requests = set(record.build_requests)
        self.realisations = set(record.realisations)
        self.builds = record.builds
        self.added_bytes = record.added_bytes
        self.holds_slot = record.holds_slot
        self.seen_process = True
        self.socket_path.unlink(missing_ok=True)  # the dead socket of the previous run
        await self._listen()
        self.journal = SessionJournal.of(self.context.state_dir, self.sid)
        self.state = SessionState.OPEN
        self.opened_at = time.time()

    async def _listen(self) -> None:
        self.server = await asyncio.get_running_loop().create_unix_server(
            lambda: ClientProtocol(self), path=str(self.socket_path)
        )
        os.chmod(self.socket_path, 0o666)

    def drop_slot(self) -> bool:
        """Stop counting against ``daemon.max-sessions``; whether it did."""
        held, self.holds_slot = self.holds_slot, False
        return held

    def record(self) -> SessionRecord:
        """This session as a journal header describes it."""
        return SessionRecord(
            sid=self.sid,
            drv_path=self.drv_path,
            chroot=str(self.chroot),
            readonly=self.readonly,
            depth=self.depth,
            parent=self.parent.sid if self.parent is not None else None,
            holds_slot=self.holds_slot,
        )

    def journal_change(self, **change: Any) -> None:
        """Append one change to the journal (see SessionJournal.record)."""
        if self.journal is not None:
            try:
                self.journal.record(**change)
            except OSError as e:  # resuming after a restart is a bonus, never a failure
                log.warning("session %s: cannot write its journal: %s", self.sid, e)

    async def _input_closure(self) -> set[str]:
        assert self.keeper is not None
        roots = set(self.drv.input_srcs)
        for input_drv, wanted in self.drv.input_drv_outputs.items():
            outputs = await self.keeper.query_derivation_output_map(input_drv)
            for name, path in outputs.items():
                if path and (name in wanted or "*" in wanted):
                    roots.add(path)
        return await self._closure(roots)

    async def _closure(self, roots: Iterable[str], known: set[str] | None = None) -> set[str]:
        """Closure of ``roots`` over references on the keeper, stopping at paths in
        ``known`` (the session's own: its inputs, and on resume what it had allowed)."""
        assert self.keeper is not None
        return await censored_closure(
            self.keeper.query_path_info, roots, known or frozenset(), self.path_infos
        )

    def summary(self) -> dict[str, Any]:
        """What ``recnix status`` shows of this session (JSON-ready)."""
        return {
            "session": self.sid,
            "drv": self.drv_path,
            "socket": str(self.socket_path),
            "chroot": str(self.chroot),
            "depth": self.depth,
            "readonly": self.readonly,
            "state": self.state.value,
            "added": len(self.added),
            "builds": self.builds,
            "added_bytes": self.added_bytes,
            "connections": self.connection_limit.active,
            "opened": self.opened_at,
        }

    def begin_finalising(self) -> None:
        """The build ended: from now on its outputs are being finalised (journaled
        before any output is touched, so a restarted service knows)."""
        self.state = SessionState.FINALISING
        self.journal_change(finalising=True)

    async def stop_serving(self) -> bool:
        """Stop listening and end the client connections. False if the session was
        already closed."""
        if self.state is SessionState.CLOSED:
            return False
        self.state = SessionState.CLOSED
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        return True

    async def _close_upstreams(self) -> None:
        """Close the upstream connections (the keeper's temp roots go with it)."""
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
            await asyncio.gather(self._ready, return_exceptions=True)
        await self.context.upstreams.drop(self.sid)
        if self.keeper is not None:
            await self.keeper.close()
        registrar = self.take_registrar()
        if registrar is not None:
            await asyncio.get_running_loop().run_in_executor(None, registrar.close)

    async def _disconnect(self) -> bool:
        """Stop serving; close the upstream connections. False if already closed."""
        if not await self.stop_serving():
            return False
        await self._close_upstreams()
        return True

    async def release_sandbox(self) -> None:
        """Undo what the sandbox was given (mounts, link farms) while its chroot is still
        this build's: before the build's post-build hook returns, after which Nix may
        give the chroot's name to a new build of the same .drv."""
        if not self.view.materialised:
            self.view.close()
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.view.cleanup)
        except Exception as e:  # the sandbox may be half gone; cleanup must not raise
            log.warning("session %s: sandbox cleanup: %s", self.sid, e)

    def forget(self) -> None:
        """Remove the journal: a restarted service no longer sees this session (nor
        takes a finalised one for half finalised)."""
        if self.journal is not None:
            self.journal.remove()

    async def let_go(self, reason: str) -> None:
        """After :meth:`stop_serving`, :meth:`release_sandbox` and :meth:`forget`:
        close the upstream connections, drop the roots (temp and gcroots) and the socket
        directory (a service that stops before this sweeps them when it starts again)."""
        await self._close_upstreams()
        try:  # it holds the socket only (a resumed session's old one is gone already)
            self.socket_path.unlink(missing_ok=True)
            self.socket_dir.rmdir()
        except OSError:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        self.roots.remove()
        # A finalised session's end is in the "finalised" line already.
        level = logging.DEBUG if reason == "finalised" else logging.INFO
        log.log(level, "session %s (%s) closed: %s", self.sid, self.drv_path, reason)

    def start_registrar(self) -> None:
        """Start the `nix-store` process that finalisation will use (register.Registrar),
        so that its start-up is not on the post-build hook's critical path; called once
        the session has added or built something. A read-only session adds and builds
        nothing, so finalising it registers nothing."""
        if self.readonly or self.state is not SessionState.OPEN or self.registrar is not None:
            return
        try:
            self.registrar = Registrar(os.environ)
        except FinaliseError as e:  # finalisation starts one itself, and reports the error
            log.warning("session %s: %s", self.sid, e)

    def take_registrar(self) -> Registrar | None:
        """The registrar started for this session, now the caller's to use or close."""
        registrar, self.registrar = self.registrar, None
        return registrar

    async def close(self, reason: str) -> None:
        """End the session: stop serving, clean the sandbox, close the upstream
        connections, drop roots (temp and gcroots)."""
        if await self.stop_serving():
            await self.release_sandbox()
            self.forget()
            await self.let_go(reason)

    async def detach(self) -> None:
        """The service stops: drop connections, keep the journal, the GC roots, the socket
        directory and what the sandbox sees, so the next run can resume the session."""
        if await self._disconnect():
            log.info("session %s (%s) detached: the service stops", self.sid, self.drv_path)

    # -- upstream connections

    @property
    def hooks_optional(self) -> bool:
        """Whether nested builds that open no session may skip nix.conf's hooks."""
        return self.context.hooks_optional

    async def take_upstream(self, hooks: bool) -> Upstream:
        """A connection to the real nix-daemon for one of this session's clients (one it
        gave back, else new): ``hooks``, builds on it run nix.conf's pre- and
        post-build hooks (see ``UpstreamPool.connect``)."""
        return await self.context.upstreams.lease(self.sid, hooks)

    async def release_upstream(self, up: Upstream) -> None:
        """A client is done with ``up``: kept for the next while the session is open."""
        await self.context.upstreams.give_back(self.sid, up, keep=self.state is SessionState.OPEN)

    def audit(self, event: str, **fields: Any) -> None:
        """Write one audit event of this session."""
        self.context.audit.write(event, self.sid, drv=self.drv_path, **fields)

    # -- the allowed set

    def requested_directly(self, drv_path: str) -> bool:
        """Whether this session asked to build ``drv_path`` itself."""
        return drv_path in self.build_requests

    def requested(self, drv_path: str) -> bool:
        """Whether building what this session asked for builds ``drv_path`` (reads .drv
        files: call it off the event loop)."""
        if drv_path in self.build_requests:
            return True
        closure = self._requested_closure
        if closure is None:
            closure = frozenset(p for p, _ in drv_closure(self.build_requests))
            self._requested_closure = closure
        return drv_path in closure

    def note_build_request(self, drv_paths: Iterable[str]) -> None:
        """Count one nested build request of ``drv_paths``."""
        self.builds += 1
        new = {p for p in drv_paths if p.endswith(".drv")} - self.build_requests
        if new:
            self.build_requests |= new
            self._requested_closure = None
        self.journal_change(builds=self.builds, build_requests=new)

    async def allow(self, paths: Iterable[str], event: str) -> None:
        """Root, materialise and allow ``paths`` (already closed under references if
        needed, and kept by the caller: ``Store.keep``, on this session's keeper)."""
        async with self._allow_lock:
            new = sorted(p for p in set(paths) if p not in self.allowed)
            if not new:
                return
            t1 = time.perf_counter()
            try:
                self.roots.add(new)
            except OSError as e:
                raise MaterialiseError(
                    f"cannot root {new[0]} under {self.roots.path} (daemon.gc-roots-dir): {e}"
                ) from None
            t2 = time.perf_counter()
            synced = await asyncio.get_running_loop().run_in_executor(None, self._make_visible, new)
            t3 = time.perf_counter()
            self.allowed.update(new)
            self.added.update(new)
            if self.registrar is None:
                # finalisation will register references to these: start its nix-store
                # now, after this reply (the spawn costs the loop a few ms)
                asyncio.get_running_loop().call_soon(self.start_registrar)
            self.journal_change(
                allowed=new,
                materialised={p: m for p in new if (m := self.view.materialised.get(p))},
                added_bytes=self.added_bytes,
            )
            for path in new:
                self.context.audit.write(event, self.sid, drv=self.drv_path, path=path)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "session %s: %s %d path(s) in %.1f ms: gc roots %.1f, "
                    "fsync %.1f, materialise %.1f, journal and audit %.1f",
                    self.sid,
                    event,
                    len(new),
                    1e3 * (time.perf_counter() - t1),
                    1e3 * (t2 - t1),
                    1e3 * synced,
                    1e3 * (t3 - t2 - synced),
                    1e3 * (time.perf_counter() - t3),
                )

    def _make_visible(self, paths: list[str]) -> float:
        """Durable first if so configured (``daemon.fsync-paths``: the build relies on them
        from now on), then in the sandbox; returns the seconds the fsyncs took."""
        started = time.perf_counter()
        if self.context.fsync_paths:
            fsync_paths(paths)
        synced = time.perf_counter() - started
        self.view.materialise_many(paths)
        return synced

    # -- connections

    def accept(self, transport: asyncio.Transport, protocol: ClientProtocol) -> None:
        """A client connected: check it is the build's, then serve it in a task (the
        first client's waits, not reading, until the session is :meth:`ready`)."""
        sock = transport.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
        except OSError as e:
            log.warning("session %s: no peer credentials (%s): closing", self.sid, e)
            transport.close()
            return
        if self.state is not SessionState.OPEN:
            log.info(
                "session %s: connection from pid %d after the session ended", self.sid, peer.pid
            )
            transport.close()
            return
        reason = self._outsider(sock, peer)
        if reason is not None:
            log.warning(
                "session %s: refused connection from pid %d uid %d: %s",
                self.sid,
                peer.pid,
                peer.uid,
                reason,
            )
            self.context.audit.write(
                "refused", self.sid, drv=self.drv_path, op="connect", reason=reason
            )
            transport.close()
            return
        if not self.connection_limit.take():
            self._refuse_excess(peer, transport)
            return
        handler = None
        if self.is_ready:
            handler = ConnectionHandler(self, transport, peer)
            protocol.attach(handler)
        else:
            transport.pause_reading()
        task = asyncio.ensure_future(self._serve(protocol, transport, peer, handler))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _outsider(self, sock: socket.socket, peer: Peer) -> str | None:
        """Why the process at the other end of ``sock`` may not use this session, or None.

        It must run in the build's sandbox (its root is the chroot, checked through a pidfd
        of the peer) and in the sandbox's mount namespace as first seen (pinned by the view):
        recnix makes paths visible only there, and never in a namespace a process chose."""
        proc = SandboxProcess.from_peer(sock, peer.pid, self.chroot)
        if proc is None:
            return f"pid {peer.pid} (uid {peer.uid}) is not inside the build's sandbox"
        with proc:
            if not self.view.pin(proc):
                return (
                    f"pid {peer.pid} (uid {peer.uid}) runs in a mount namespace of its own, "
                    "not the build sandbox's: recnix serves only the sandbox's namespace"
                )
        return None

    async def _serve(
        self,
        protocol: ClientProtocol,
        transport: asyncio.Transport,
        peer: Peer,
        handler: ConnectionHandler | None,
    ) -> None:
        started = time.perf_counter()
        log.debug("session %s: connection from pid %d", self.sid, peer.pid)
        try:
            if handler is None:
                handler = await self._handler_when_ready(protocol, transport, peer)
                if handler is None:
                    return
            await handler.run()
        finally:
            self.connection_limit.give_back()
            if handler is not None:
                await handler.close()
            else:
                transport.close()
            log.debug(
                "session %s: connection from pid %d closed after %.1f ms",
                self.sid,
                peer.pid,
                1e3 * (time.perf_counter() - started),
            )

    async def _handler_when_ready(
        self, protocol: ClientProtocol, transport: asyncio.Transport, peer: Peer
    ) -> ConnectionHandler | None:
        """The handler of a client that came before the session was ready; None if the
        session cannot get ready (logged and audited) or the client left meanwhile."""
        try:
            await self.ready()
        except Exception as e:  # noqa: BLE001 - any failure: this client is told by a close
            reason = f"cannot reach the nix-daemon for the build's inputs: {e}"
            log.warning(
                "session %s: closing the connection of pid %d: %s", self.sid, peer.pid, reason
            )
            self.context.audit.write(
                "refused", self.sid, drv=self.drv_path, op="connect", reason=reason
            )
            return None
        if protocol.lost or transport.is_closing():
            return None
        handler = ConnectionHandler(self, transport, peer)
        protocol.attach(handler)
        return handler

    def _refuse_excess(self, peer: Peer, transport: asyncio.Transport) -> None:
        """Close a connection above the per-session limit (audited once per burst)."""
        if self.connection_limit.refusal_worth_logging:
            reason = self.connection_limit.describe_refusals()
            log.warning(
                "session %s: refused connection from pid %d: %s", self.sid, peer.pid, reason
            )
            self.context.audit.write(
                "refused", self.sid, drv=self.drv_path, op="connect", reason=reason
            )
        transport.close()


class ClientProtocol(asyncio.Protocol):
    """Hands one client connection's bytes and state changes to its ConnectionHandler;
    keeps what comes before there is one (the session is getting ready) and hands it
    over with :meth:`attach`."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.handler: ConnectionHandler | None = None
        self.early: list[bytes] = []  # received before the handler, b"" for an EOF
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.session.accept(transport, self)  # type: ignore[arg-type]

    def attach(self, handler: ConnectionHandler) -> None:
        """Hand the connection, and what it received so far, to ``handler``."""
        assert self.transport is not None
        self.handler = handler
        self.transport.resume_reading()
        early, self.early = self.early, []
        for data in early:
            handler.on_data(data)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.on_data(data)
        elif self.transport is not None:
            # Until attach. Some loops read once after pause_reading() in
            # connection_made (uvloop, Python 3.11.2's asyncio); a client sends a few
            # handshake bytes and waits, so more than EARLY_LIMIT is not a Nix client.
            self.early.append(data)
            self.transport.pause_reading()
            received = sum(map(len, self.early))
            if received > EARLY_LIMIT:
                log.warning(
                    "session %s: a client sent %d bytes before its handshake was "
                    "answered: closing it",
                    self.session.sid,
                    received,
                )
                self.early.clear()
                self.transport.close()

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            self.handler.on_data(b"")
            return True  # a half-closed client still gets its replies; the handler closes
        self.early.append(b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.handler is not None:
            self.handler.on_lost()

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.paused = True

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.paused = False
            self.handler.wake()
