"""An asyncio client of a real nix-daemon, built on the sans-IO codec.

Used by the sessions to forward what they allow, and by tests. One operation
is in flight per connection at a time; log frames the daemon sends while it
works are handed to an optional callback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from recnix.formats.derivation import Derivation, DerivationError, read_derivation
from recnix.protocol import (
    NEED_DATA,
    ClientConnection,
    ClientOptions,
    ConnectionClosed,
    DerivedPath,
    ErrorReply,
    HandshakeDone,
    KeyedBuildResult,
    Log,
    Missing,
    Op,
    PathInfo,
    ProtocolError,
    Reply,
    ValidPathInfo,
)
from recnix.protocol.connection import Event
from recnix.protocol.nar import dump_path
from recnix.store import aio
from recnix.store.aio import READ_CHUNK, stream_data
from recnix.store.seam import LogCallback, StoreError

DEFAULT_SOCKET = "/nix/var/nix/daemon-socket/socket"
log = logging.getLogger("recnix.store.upstream")


class UpstreamError(StoreError):
    """The daemon answered an operation with an error (its message is the text)."""


class UpstreamClosed(UpstreamError):
    """The connection to the daemon is gone."""


# The AddToStore methods Nix 2.8 parses. It parses the method after starting work but
# before reading the framed data, so any other method leaves the frames unread: the
# daemon then takes them for requests (and may allocate gigabytes for a "length").
CA_METHOD = re.compile(r"(text:sha256|fixed:(r:)?(md5|sha1|sha256|sha512))")


def check_ca_method(ca_method: str) -> None:
    """Raise UpstreamError (sending nothing) unless the daemon can take ``ca_method``."""
    if not CA_METHOD.fullmatch(ca_method):
        raise UpstreamError(
            f"content-address method '{ca_method}' is not one of 'text:sha256', "
            "'fixed:<algo>' or 'fixed:r:<algo>' (algo: md5, sha1, sha256, sha512)"
        )


def daemon_socket_path() -> str:
    """The system daemon socket ($NIX_DAEMON_SOCKET_PATH, else Nix's default)."""
    return os.environ.get("NIX_DAEMON_SOCKET_PATH") or DEFAULT_SOCKET


def connect_error_message(target: str, error: OSError) -> str:
    """Why connecting to ``target`` failed, naming the socket (or command) and the fixes."""
    if target == "stdio":
        return (
            f'cannot start `nix-daemon --stdio` (daemon.upstream = "stdio"): '
            f"{error.strerror or error}; install Nix or put nix-daemon on the service's PATH"
        )
    path = target[len("unix://") :] if target.startswith("unix://") else daemon_socket_path()
    reason = error.strerror or str(error)
    if isinstance(error, (FileNotFoundError, ConnectionRefusedError)):
        return (
            f"cannot connect to the nix-daemon at {path} (daemon.upstream = {target!r}): "
            f"{reason}; start the nix-daemon (`systemctl start nix-daemon`, or run "
            f'`nix-daemon`), or set daemon.upstream = "stdio" in the recnix config so '
            "that each session starts `nix-daemon --stdio` itself"
        )
    return f"cannot connect to the nix-daemon at {path} (daemon.upstream = {target!r}): {reason}"


class LocalStoreFiles:
    """The Store methods that read the store's files: the daemon serves the store this
    machine mounts, so they are read here rather than over the protocol."""

    def read_derivation(self, drv_path: str) -> Derivation | None:
        """The parsed derivation at ``drv_path`` (None: absent or not a derivation)."""
        try:
            return read_derivation(Path(drv_path))
        except (OSError, DerivationError):
            return None

    def path_exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def dump(self, path: str) -> Iterator[bytes]:
        return dump_path(path)


class Upstream(LocalStoreFiles):
    """One worker-protocol connection to a nix-daemon (a :class:`recnix.store.seam.Store`)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | None,
        conn: ClientConnection,
        process: asyncio.subprocess.Process | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._process = process
        self._lock = asyncio.Lock()
        self.handshake: HandshakeDone | None = None
        self.closed = False
        self._in_op = False
        self.runs_hooks = True  # builds on it run nix.conf's pre-/post-build hooks

    # -- connecting

    @classmethod
    async def connect(
        cls,
        target: str = "daemon",
        client_minor: int = 35,
        hooks: bool = True,
    ) -> Upstream:
        """Connect to ``target`` ("daemon", "unix:///path" or "stdio"), handshake, SetOptions.

        ``hooks=False`` asks the daemon to build without nix.conf's pre- and
        post-build hooks on this connection (honoured for trusted clients, as
        root is by default; otherwise the hooks simply still run).
        """
        process = None
        try:
            if target == "stdio":
                from recnix.store.storeenv import local_env

                # the local store, never a daemon (Lix >= 2.94 would forward to any
                # socket file there, even a dead one): recnix.store.storeenv
                process = await asyncio.create_subprocess_exec(
                    "nix-daemon",
                    "--stdio",
                    env=local_env(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=READ_CHUNK * 4,
                )
                assert process.stdout is not None and process.stdin is not None
                reader = process.stdout
                writer = PipeWriter(process.stdin)
            else:
                path = (
                    target[len("unix://") :]
                    if target.startswith("unix://")
                    else daemon_socket_path()
                )
                reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK * 4)
        except OSError as e:
            raise UpstreamClosed(connect_error_message(target, e)) from e
        self = cls(reader, writer, ClientConnection(client_minor=client_minor), process)  # type: ignore[arg-type]
        try:
            ev = await self._handshake("the nix-daemon")
            log.debug(
                "nix-daemon %s (%s): protocol 1.%d (it offered 1.%d, recnix asked 1.%d)",
                ev.nix_version or "(version not sent)",
                target,
                ev.minor,
                ev.server_minor,
                ev.client_minor,
            )
            await self.call(Op.SET_OPTIONS, {"options": default_options(hooks)})
        except BaseException:  # failed or cancelled half way: no connection left open
            await self.close()
            raise
        self.runs_hooks = hooks
        return self

    @classmethod
    async def over_process(
        cls, process: asyncio.subprocess.Process, client_minor: int, peer: str
    ) -> Upstream:
        """A connection over the pipes of ``process`` (already started, e.g. ``ssh HOST
        nix-daemon --stdio``), handshaken at ``client_minor``; no SetOptions (the caller
        sends its own, or relays its client's). ``peer`` names it in errors."""
        assert process.stdout is not None and process.stdin is not None
        conn = ClientConnection(client_minor=client_minor)
        self = cls(process.stdout, PipeWriter(process.stdin), conn, process)  # type: ignore[arg-type]
        await self._handshake(peer)
        return self

    async def _handshake(self, peer: str) -> HandshakeDone:
        """Run the client handshake; UpstreamError (the connection closed) if it fails."""
        self._conn.initiate()
        await self.flush()
        ev = await self.next_event()
        if isinstance(ev, ErrorReply):
            await self.close()
            raise UpstreamError(ev.error.message)
        if not isinstance(ev, HandshakeDone):
            await self.close()
            raise UpstreamClosed(f"unexpected handshake event from {peer}: {ev!r}")
        self.handshake = ev
        return ev

    @property
    def conn(self) -> ClientConnection:
        """The sans-IO connection, for relaying: queue requests and data on it, then
        :meth:`flush`; read what comes back with :meth:`next_event`."""
        return self._conn

    @property
    def minor(self) -> int:
        """The negotiated protocol minor."""
        assert self.handshake is not None
        return self.handshake.minor

    @property
    def nix_version(self) -> str:
        """The daemon's Nix version string (or "unknown" before 1.33)."""
        assert self.handshake is not None
        return getattr(self.handshake, "nix_version", None) or "unknown"

    # -- plumbing

    async def flush(self) -> None:
        """Send what the connection has queued."""
        data = self._conn.data_to_send()
        if data and self._writer is not None:
            self._writer.write(data)
            await self._writer.drain()

    async def next_event(self) -> Event:
        """The next event from the daemon (UpstreamClosed when it closed the connection)."""
        ev = await aio.next_event(self._conn, self._reader, self.flush)
        if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
            self.closed = True
            raise UpstreamClosed("the nix-daemon closed the connection")
        return ev

    async def _await_reply(self, on_log: LogCallback | None) -> Any:
        while True:
            ev = await self.next_event()
            if isinstance(ev, Log):
                if on_log is not None:
                    result = on_log(ev.msg)
                    if result is not None:
                        await result
            elif isinstance(ev, ErrorReply):
                self._close_if_daemon_gave_up()
                raise UpstreamError(ev.error.message)
            elif isinstance(ev, Reply):
                return ev.value
            elif isinstance(ev, ConnectionClosed):
                self.closed = True
                raise UpstreamClosed("the nix-daemon closed the connection")
            else:
                raise UpstreamClosed(f"unexpected event from the nix-daemon: {ev!r}")

    def _close_if_daemon_gave_up(self) -> None:
        """After an error reply, anything already received means the daemon is hanging up.

        Nix's daemon answers an error raised before it started work (e.g. a bad
        store path argument) twice and closes the connection; the second copy
        must not be taken for the next request's answer.
        """
        try:
            ev = self._conn.next_event()
        except ProtocolError:
            ev = None
        if ev is not NEED_DATA:
            self.closed = True

    async def _send_stream(self, data: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        if isinstance(data, AsyncIterable):
            async for chunk in data:
                self._conn.send_data(chunk)
                await self.flush()
        else:
            for chunk in data:
                self._conn.send_data(chunk)
                await self.flush()
        self._conn.send_end_of_data()
        await self.flush()

    # -- operations

    async def call(
        self,
        op: Op,
        args: dict[str, Any] | None = None,
        *,
        data: AsyncIterable[bytes] | Iterable[bytes] | None = None,
        on_log: LogCallback | None = None,
    ) -> Any:
        """Send one request (and its stream) and return the reply value.

        Raises UpstreamError with the daemon's message when it refuses.
        """
        if self.closed:
            raise UpstreamClosed("the connection to the nix-daemon is closed")
        if op == Op.ADD_TO_STORE and args and "ca_method" in args:
            check_ca_method(args["ca_method"])
        async with self._lock:
            self._in_op = True  # stays set if the call is cancelled: out of sync
            try:
                result = await self._call(op, args, data, on_log)
            except UpstreamClosed:
                raise
            except UpstreamError:
                self._in_op = False  # the daemon answered with an error: still in sync
                raise
            self._in_op = False
            return result

    @property
    def reusable(self) -> bool:
        """Open (also as far as the daemon is concerned), and not left in the middle of
        an operation (e.g. by a cancelled call)."""
        return not self.closed and not self._in_op and not self._reader.at_eof()

    async def _call(
        self,
        op: Op,
        args: dict[str, Any] | None,
        data: AsyncIterable[bytes] | Iterable[bytes] | None,
        on_log: LogCallback | None,
    ) -> Any:
        try:
            self._conn.send_request(op, args or {})
            await self.flush()
            if data is None:
                return await self._await_reply(on_log)
            # Read the daemon's messages while the stream goes out, so a
            # daemon busy logging never blocks us (and an early error ends it).
            reply_task = asyncio.ensure_future(self._await_reply(on_log))
            send_task = asyncio.ensure_future(self._send_stream(data))
            done, _ = await asyncio.wait(
                {reply_task, send_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if reply_task in done and send_task not in done:
                send_task.cancel()
                await asyncio.gather(send_task, return_exceptions=True)
                # the daemon gave up mid-stream: its reply decides, the
                # connection can no longer be trusted to be in sync
                self.closed = True
                return reply_task.result()
            send_exc = send_task.exception()
            if send_exc is not None:
                reply_task.cancel()
                await asyncio.gather(reply_task, return_exceptions=True)
                self.closed = True
                raise send_exc
            return await reply_task
        except (ConnectionError, BrokenPipeError) as e:
            self.closed = True
            raise UpstreamClosed(f"lost the connection to the nix-daemon: {e}") from e

    async def nar_from_path(self, path: str) -> AsyncIterator[bytes]:
        """Stream the NAR of ``path`` (op 38)."""
        async with self._lock:
            self._in_op = True  # until the whole NAR is read
            self._conn.send_request(Op.NAR_FROM_PATH, {"path": path})
            await self.flush()
            await self._await_reply(None)
            async for chunk in stream_data(self.next_event, UpstreamClosed):
                yield chunk
            self._in_op = False

    async def is_valid_path(self, path: str) -> bool:
        return bool(await self.call(Op.IS_VALID_PATH, {"path": path}))

    async def query_path_info(self, path: str) -> PathInfo | None:
        return await self.call(Op.QUERY_PATH_INFO, {"path": path})

    async def query_valid_paths(self, paths: Iterable[str], substitute: bool = False) -> list[str]:
        return await self.call(
            Op.QUERY_VALID_PATHS, {"paths": sorted(paths), "substitute": substitute}
        )

    async def query_derivation_output_map(self, drv_path: str) -> dict[str, str | None]:
        return await self.call(Op.QUERY_DERIVATION_OUTPUT_MAP, {"drv_path": drv_path})

    async def query_missing(self, targets: list[DerivedPath]) -> Missing:
        return await self.call(Op.QUERY_MISSING, {"targets": targets})

    async def query_derivation_outputs(self, drv_path: str) -> list[str]:
        return await self.call(Op.QUERY_DERIVATION_OUTPUTS, {"path": drv_path})

    async def query_derivation_output_names(self, drv_path: str) -> list[str]:
        return await self.call(Op.QUERY_DERIVATION_OUTPUT_NAMES, {"path": drv_path})

    async def query_realisation(self, rid: str) -> Any:
        return await self.call(Op.QUERY_REALISATION, {"id": rid})

    async def add_temp_root(self, path: str) -> None:
        await self.call(Op.ADD_TEMP_ROOT, {"path": path})

    async def keep(self, paths: Iterable[str]) -> None:
        """Temp roots for ``paths``: they last as long as this connection."""
        for path in paths:
            await self.add_temp_root(path)

    async def build_paths(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: LogCallback | None = None,
        hooks: bool = True,
    ) -> None:
        """BuildPaths (``hooks`` is informational: this connection's SetOptions decide)."""
        await self.call(Op.BUILD_PATHS, {"paths": targets, "build_mode": build_mode}, on_log=on_log)

    async def build_paths_with_results(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: LogCallback | None = None,
        hooks: bool = True,
    ) -> list[KeyedBuildResult]:
        return await self.call(
            Op.BUILD_PATHS_WITH_RESULTS,
            {"paths": targets, "build_mode": build_mode},
            on_log=on_log,
        )

    async def add_to_store(
        self,
        name: str,
        ca_method: str,
        references: Iterable[str],
        data: AsyncIterable[bytes] | Iterable[bytes],
        repair: bool = False,
    ) -> ValidPathInfo:
        """AddToStore (≥ 1.25): ``ca_method`` e.g. "text:sha256", "fixed:r:sha256"."""
        return await self.call(
            Op.ADD_TO_STORE,
            {
                "name": name,
                "ca_method": ca_method,
                "references": sorted(references),
                "repair": repair,
            },
            data=data,
        )

    async def add_to_store_nar(
        self,
        info: ValidPathInfo,
        data: AsyncIterable[bytes] | Iterable[bytes],
        repair: bool = False,
        dont_check_sigs: bool = False,
    ) -> None:
        """AddToStoreNar (framed NAR, ≥ 1.23)."""
        i = info.info
        await self.call(
            Op.ADD_TO_STORE_NAR,
            {
                "path": info.path,
                "deriver": i.deriver,
                "nar_hash": i.nar_hash,
                "references": list(i.references),
                "registration_time": i.registration_time,
                "nar_size": i.nar_size,
                "ultimate": i.ultimate,
                "sigs": list(i.sigs),
                "ca": i.ca,
                "repair": repair,
                "dont_check_sigs": dont_check_sigs,
            },
            data=data,
        )

    async def close(self) -> None:
        """Close the connection (the daemon then drops this connection's temp roots)."""
        self.closed = True
        if self._writer is not None:
            try:
                self._writer.close()
                await self._writer.wait_closed()
            except (OSError, ConnectionError):
                pass
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()

    def abort(self) -> None:
        """Drop the connection at once (e.g. mid-stream, so the daemon discards a partial add)."""
        self.closed = True
        if self._writer is not None:
            transport = getattr(self._writer, "transport", None)
            if transport is not None:
                transport.abort()
            else:
                self._writer.close()
        if self._process is not None and self._process.returncode is None:
            self._process.kill()


class PipeWriter:
    """Adapts a subprocess stdin to the StreamWriter methods Upstream uses."""

    def __init__(self, stdin: asyncio.StreamWriter) -> None:
        self._stdin = stdin
        self.transport = stdin.transport

    def write(self, data: bytes) -> None:
        self._stdin.write(data)

    async def drain(self) -> None:
        await self._stdin.drain()

    def close(self) -> None:
        self._stdin.close()

    async def wait_closed(self) -> None:
        await self._stdin.wait_closed()


def default_options(hooks: bool = True) -> ClientOptions:
    """The SetOptions recnix sends upstream (its sandboxed clients' own are ignored);
    ``hooks=False`` clears nix.conf's pre- and post-build hooks for this connection."""
    return ClientOptions(
        verbosity=3,  # lvlInfo: build log lines and activities reach us
        max_build_jobs=max(1, os.cpu_count() or 1),
        verbose_build=0,  # 0 = lvlError means "verbose build" in SetOptions
        use_substitutes=1,
        overrides={} if hooks else {"pre-build-hook": "", "post-build-hook": ""},
    )
