"""One in-sandbox client connection of a session: the proxy that decodes its requests,
has its :class:`~recnix.store.restricted.RestrictedStore` answer them over daemon
connections leased from the service's pool, and encodes the replies. No policy here.

What it needs of its session is :class:`ServedSession` (recnix.daemon.session.Session
is one; the unit tests' in-memory session another), so this module does not import
the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from recnix.protocol import (
    NEED_DATA,
    NOT_TRUSTED,
    ConnectionClosed,
    DerivedPath,
    HandshakeDone,
    KeyedBuildResult,
    Missing,
    Op,
    PathInfo,
    ProtocolError,
    Request,
    ServerConnection,
    StderrMessage,
    StreamKind,
    ValidPathInfo,
    op_spec,
)
from recnix.sandbox.materialise import MaterialiseError
from recnix.store.aio import serve_requests, stream_data
from recnix.store.policy import Denied
from recnix.store.restricted import SYNC_OPS, NarReply, RestrictedStore, SessionState
from recnix.store.seam import Data as StoreData
from recnix.store.seam import LogCallback, StoreError
from recnix.store.upstream import LocalStoreFiles, Upstream, UpstreamClosed

log = logging.getLogger("recnix.daemon.connection")

# Bytes received from a client and not yet consumed: above the high mark the
# handler stops reading its socket (the client then blocks in write), below the
# low mark it reads again. A 256 MiB add thus streams through a few MiB.
READ_HIGH_WATER = 1 << 20
READ_LOW_WATER = 1 << 18


@dataclass(frozen=True)
class Peer:
    """Credentials of an in-sandbox client (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid/uid/gid."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class ServedSession(SessionState, Protocol):
    """What a connection reads and asks of its session, beyond the restricted store's
    :class:`~recnix.store.restricted.SessionState`."""

    @property
    def keeper(self) -> Upstream | None:
        """The session's own daemon connection, which lives as long as the session: its
        Nix version is the one to announce, and it holds the session's temp roots."""
        ...

    @property
    def hooks_optional(self) -> bool:
        """Whether nested builds that open no session may skip nix.conf's hooks."""
        ...

    async def take_upstream(self, hooks: bool) -> Upstream:
        """A daemon connection for this client (see ``Session.take_upstream``)."""
        ...

    async def release_upstream(self, up: Upstream) -> None:
        """This client is done with ``up``."""
        ...


class ConnectionUpstreams(LocalStoreFiles):
    """The :class:`~recnix.store.seam.Store` one client connection forwards to: its session's
    upstream connections, taken when first needed, one that runs nix.conf's build hooks
    and (when ``SessionContext.hooks_optional``) one that does not; what it keeps is
    kept on the session's keeper, which outlives the connection. This is a restricted
    store's one route to the daemon."""

    def __init__(self, session: ServedSession) -> None:
        self.session = session
        self.upstreams: dict[bool, Upstream] = {}

    async def up(self, hooks: bool = False) -> Upstream:
        """The upstream connection; ``hooks``: builds on it must run nix.conf's hooks
        (always so unless ``SessionContext.hooks_optional``)."""
        hooks = hooks or not self.session.hooks_optional
        up = self.upstreams.get(hooks)
        if up is None or up.closed:
            up = self.upstreams[hooks] = await self.session.take_upstream(hooks)
        return up

    async def release(self) -> None:
        for up in self.upstreams.values():
            await self.session.release_upstream(up)
        self.upstreams.clear()

    async def keep(self, paths: Iterable[str]) -> None:
        keeper = self.session.keeper
        if keeper is None:  # a client is served only once its session is ready
            raise StoreError("the session has no daemon connection to keep paths on")
        await keeper.keep(paths)

    async def query_path_info(self, path: str) -> PathInfo | None:
        return await (await self.up()).query_path_info(path)

    async def query_valid_paths(self, paths: Iterable[str], substitute: bool = False) -> list[str]:
        return await (await self.up()).query_valid_paths(paths, substitute)

    async def query_derivation_outputs(self, drv_path: str) -> list[str]:
        return await (await self.up()).query_derivation_outputs(drv_path)

    async def query_derivation_output_names(self, drv_path: str) -> list[str]:
        return await (await self.up()).query_derivation_output_names(drv_path)

    async def query_derivation_output_map(self, drv_path: str) -> dict[str, str | None]:
        return await (await self.up()).query_derivation_output_map(drv_path)

    async def query_missing(self, targets: list[DerivedPath]) -> Missing:
        return await (await self.up()).query_missing(targets)

    async def query_realisation(self, rid: str) -> Any:
        return await (await self.up()).query_realisation(rid)

    async def add_to_store(
        self, name: str, ca_method: str, references: Iterable[str], data: StoreData
    ) -> ValidPathInfo:
        return await (await self.up()).add_to_store(name, ca_method, references, data)

    async def add_to_store_nar(self, info: ValidPathInfo, data: StoreData) -> None:
        await (await self.up()).add_to_store_nar(info, data)

    async def build_paths(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: LogCallback | None = None,
        hooks: bool = True,
    ) -> None:
        await (await self.up(hooks)).build_paths(targets, build_mode, on_log)

    async def build_paths_with_results(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: LogCallback | None = None,
        hooks: bool = True,
    ) -> list[KeyedBuildResult]:
        return await (await self.up(hooks)).build_paths_with_results(targets, build_mode, on_log)


class ConnectionHandler:
    """Serves one in-sandbox client connection: decodes requests, has its
    :class:`~recnix.store.restricted.RestrictedStore` answer them, encodes the replies.
    No policy here: what each op may do is the restricted store's.

    A task (``run``) serves requests in order. While it waits for the next
    request, ``on_data`` answers requests that need no I/O (IsValidPath, a
    QueryPathInfo it has cached, ...) directly from the event loop's read
    callback, which saves a task switch per query; anything else is handed
    to the task.
    """

    def __init__(self, session: ServedSession, transport: asyncio.Transport, peer: Peer) -> None:
        self.session = session
        self.transport = transport
        self.peer = peer
        self.pid = peer.pid
        version = session.keeper.nix_version if session.keeper else "2.8.0"
        self.conn = ServerConnection(nix_version=version, trust=NOT_TRUSTED)
        self.upstreams = ConnectionUpstreams(session)
        self.store = RestrictedStore(self.upstreams, session, self)
        self.stream_open = False  # the current request's trailing stream is not consumed yet
        self.paused = False  # the transport's write buffer is full
        self.reading_paused = False  # more than READ_HIGH_WATER received and not consumed
        self.lost = False
        self.eof_owed = False  # the client half-closed with replies owed: answer, then close
        self._idle = False  # the task waits for a request: the fast path may answer
        self._stash: list[Any] = []  # what the fast path consumed but left to the task
        self._wakeup: asyncio.Future[None] | None = None
        # QueryPathInfo replies as sent: path -> (the session's PathInfo, encoded bytes)
        self._path_info_replies: dict[str, tuple[PathInfo, bytes]] = {}

    @property
    def minor(self) -> int:
        return self.conn.minor

    # -- plumbing

    def on_data(self, data: bytes) -> None:
        """Bytes (``b""``: end of input) from the client."""
        if not data:
            # replies still owed: a client that half-closed after its requests
            self.eof_owed = not self._idle or bool(self._stash)
        elif self._idle:
            # the commonest case: one whole IsValidPath/QueryPathInfo/... request
            request = self.conn.receive_single_path_request(data)
            if request is not None:
                self._answer_fast(request)
                if self._idle:
                    return
                self.wake()
                return
        self.conn.receive_data(data)
        if self._idle:
            self._answer_fast()
            if self._idle:
                return  # all answered: the task sleeps on
        if data and self.conn.buffered > READ_HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self.wake()

    def on_lost(self) -> None:
        self.lost = True
        self.wake()

    def wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _answer_fast(self, first: Request | None = None) -> None:
        """Answer complete requests (``first``, then those buffered) that need no I/O;
        stash the first that does. What they answered goes out in one write."""
        try:
            while True:
                if first is not None:
                    ev, first = first, None
                else:
                    ev = self.conn.next_event()
                if ev is NEED_DATA:
                    return
                if ev.__class__ is Request and ev.op is Op.QUERY_PATH_INFO:
                    path = ev.args["path"]
                    info = self.store.known_path_info(path)
                    if info is not None:
                        self._send_path_info(path, info)
                        continue
                if isinstance(ev, Request) and ev.op in SYNC_OPS:
                    try:
                        pending = self._start(ev)
                    except Denied as e:
                        self._deny(ev.op, e)
                        pending = None
                    if pending is None:
                        continue
                    self._stash.append((ev, pending))
                else:
                    self._stash.append(ev)
                self._idle = False
                return
        except ProtocolError as e:
            self._stash.append(e)
            self._idle = False
        finally:
            self._write_out()

    async def _wait(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client's connection was lost")
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    def _write_out(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    async def flush(self) -> None:
        self._write_out()
        while self.paused and not self.lost:
            await self._wait()

    def _unstash(self) -> Any:
        item = self._stash.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def _resume_reading(self) -> None:
        if self.conn.buffered < READ_LOW_WATER and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    async def next_event(self) -> Any:
        while True:
            if self._stash:
                return self._unstash()
            ev = self.conn.next_event()
            if self.reading_paused:
                self._resume_reading()
            if ev is not NEED_DATA:
                return ev
            await self.flush()
            await self._wait()

    async def next_request_event(self) -> Any:
        """The next event at a message boundary (requests the fast path answered are done).

        Returns ``(request, pending)`` when the fast path started a request's
        handler that still has to be awaited.
        """
        while True:
            if self._stash:
                ev = self._unstash()
            else:
                ev = self.conn.next_event()
                if self.reading_paused:
                    self._resume_reading()
                if ev is NEED_DATA:
                    await self.flush()
                    self._idle = True
                    try:
                        await self._wait()
                    finally:
                        self._idle = False
                    continue
            if isinstance(ev, Request):
                self.stream_open = op_spec(ev.op).stream(self.conn.minor) is not StreamKind.NONE
            return ev

    async def stream(self) -> AsyncIterator[bytes]:
        """The current request's trailing stream, chunk by chunk."""
        async for chunk in stream_data(self.next_event, ProtocolError):
            yield chunk
        self.stream_open = False

    async def drain_stream(self) -> None:
        async for _ in self.stream():
            pass

    async def log(self, msg: StderrMessage) -> None:
        """Pass a nested build's log message on to the client."""
        self.conn.send_log(msg)
        await self.flush()

    async def close(self) -> None:
        await self.upstreams.release()
        with contextlib.suppress(ConnectionError, OSError):
            self._write_out()
        self.transport.close()

    # -- main loop

    async def run(self) -> None:
        s = self.session
        try:
            end = await serve_requests(self.next_request_event, self._answer, self.flush)
            if isinstance(end, ConnectionClosed) and self.eof_owed and not self.lost:
                log.info(
                    "session %s: client pid %d half-closed its connection with requests "
                    "pending; answered them, closing",
                    s.sid,
                    self.peer.pid,
                )
        except ProtocolError as e:
            log.warning(
                "session %s: closing connection from pid %d: protocol error: %s",
                s.sid,
                self.peer.pid,
                e,
            )
            s.audit("protocol-error", pid=self.peer.pid, reason=str(e))
            try:
                self.conn.send_error(f"recnix: protocol error: {e}")
                await self.flush()
            except Exception:  # the peer may be gone; nothing more to tell it
                pass
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("session %s: client pid %d went away: %s", s.sid, self.peer.pid, e)
        except UpstreamClosed as e:
            log.warning("session %s: upstream connection lost: %s", s.sid, e)
            try:
                self.conn.send_error(f"recnix: lost the connection to the nix-daemon: {e}")
                await self.flush()
            except Exception:
                pass

    async def _answer(self, ev: Any) -> None:
        """One event of the server loop: the handshake, a request, or a request whose
        handler the fast path started (``(request, pending)``)."""
        if isinstance(ev, HandshakeDone):
            log.debug(
                "session %s: pid %d speaks protocol 1.%d (it offered 1.%d, recnix 1.%d)",
                self.session.sid,
                self.peer.pid,
                ev.minor,
                ev.client_minor,
                ev.server_minor,
            )
        elif isinstance(ev, tuple):
            await self.dispatch(*ev)
        elif isinstance(ev, Request):
            await self.dispatch(ev)
        else:
            raise ProtocolError(f"unexpected {type(ev).__name__} between requests")

    def _start(self, req: Request) -> Awaitable[None] | None:
        """Start serving ``req``; return what is left to await (None: answered)."""
        value = self.store.serve(req.op, req.args)
        if inspect.isawaitable(value):
            return self._reply_later(req.op, req.args, value)
        if isinstance(value, NarReply):
            self.conn.send_reply(req.op, None)
            return self._send_nar(value.chunks)
        self._reply(req.op, req.args, value)
        return None

    async def _reply_later(self, op: Op, args: dict, value: Awaitable[Any]) -> None:
        result = await value
        if isinstance(result, NarReply):
            self.conn.send_reply(op, None)
            await self._send_nar(result.chunks)
        else:
            self._reply(op, args, result)

    def _reply(self, op: Op, args: dict, value: Any) -> None:
        if op is Op.QUERY_PATH_INFO and value is not None:
            self._send_path_info(args["path"], value)
            return
        self.conn.send_reply(op, value)

    def _send_path_info(self, path: str, info: PathInfo) -> None:
        """QueryPathInfo's reply, the hottest op (every nix client asks it for each path):
        the encoded reply, kept while the session keeps this PathInfo object."""
        cached = self._path_info_replies.get(path)
        if cached is None or cached[0] is not info:
            cached = (info, self.conn.encode_reply(Op.QUERY_PATH_INFO, info))
            self._path_info_replies[path] = cached
        self.conn.send_raw(cached[1])

    async def _send_nar(self, chunks: Iterator[bytes]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            chunk = await loop.run_in_executor(None, next, chunks, None)
            if chunk is None:
                break
            self.conn.send_raw(chunk)
            await self.flush()

    def _deny(self, op: Op, e: Denied) -> None:
        self.store.refused(op, str(e))
        self.conn.send_error(str(e))

    async def dispatch(self, req: Request, pending: Awaitable[None] | None = None) -> None:
        """Serve one request (``pending``: already started by the fast path)."""
        try:
            if pending is None:
                pending = self._start(req)
            if pending is not None:
                started = time.perf_counter()
                await pending
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "session %s: %s took %.1f ms",
                        self.session.sid,
                        req.op.name,
                        1e3 * (time.perf_counter() - started),
                    )
        except Denied as e:
            await self._finish_stream()
            self._deny(req.op, e)
        except UpstreamClosed:
            raise
        except StoreError as e:  # the daemon's error, or a path it does not have
            await self._finish_stream()
            self.conn.send_error(str(e))
        except MaterialiseError as e:
            self.store.refused(req.op, str(e))
            self.conn.send_error(f"recnix: {e}")

    async def _finish_stream(self) -> None:
        """After a refusal, read the rest of the op's stream so the connection stays in sync."""
        if self.stream_open:
            await self.drain_stream()
