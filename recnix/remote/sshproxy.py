"""recnix's ``ssh`` for Nix's build hook: a worker-protocol proxy to ``ssh-ng://`` builders.

Nix's build hook (``build-remote``, run by the client's nix-daemon) reaches an
``ssh-ng://`` builder by running ``ssh HOST … nix-daemon --stdio`` from PATH.
``recnix build-hook`` (``recnix.hooks.buildhook``) puts the directory of recnix's
``ssh`` first on that PATH; that ``ssh`` runs :func:`main` here. Anything that
is not a worker-protocol session (the master connection ``-M``, ``-O``
control commands, ``nix-store --serve`` of ``ssh://`` builders) is handed to
the real ssh unchanged. A ``nix-daemon --stdio`` session is proxied: the real
ssh carries it, and both ends are terminated with recnix's codec (a
:class:`ServerConnection` facing build-remote, a :class:`ClientConnection`
facing the builder), so every op passes through generically, with two
additions for builds that require ``recnix`` or ``recnix-readonly``:

* before ``BuildDerivation`` (which sends no ``.drv``), the ``.drv`` closure
  the builder lacks is copied to it (``AddToStore`` text, in dependency
  order), so that its recnix sees the build opted in and opens a session;
* after a successful build reply (``BuildDerivation``, ``BuildPaths``,
  ``BuildPathsWithResults``), the outputs' closure the client lacks, except
  the outputs themselves (build-remote copies those; its parent goal holds
  their locks), is added to the client's store through its nix-daemon, in
  dependency order, before the reply reaches build-remote. Nix copies back
  only the outputs (``build-remote.cc``), so without this an output that
  references the inner builds of its session is invalid on the client. The
  builder chose those paths: each is imported only if recnix.remote.remotetrust
  admits it (content-addressed, signed by a trusted key, the proven output of
  a derivation, or a builder named in ``remote.trusted-builders``).

Any failure of these steps answers build-remote's op with an error naming the
path and the cause; input the codec cannot parse ends the session with the
reason on stderr (which build-remote shows).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from recnix.config.names import OPT_IN_FEATURES
from recnix.formats.derivation import DerivationError, read_derivation
from recnix.protocol import (
    BuildResult,
    Data,
    DerivedPath,
    EndOfData,
    ErrorReply,
    HandshakeDone,
    Log,
    Op,
    PathInfo,
    ProtocolError,
    Reply,
    Request,
    ServerConnection,
    StreamKind,
    ValidPathInfo,
    build_succeeded,
    op_spec,
)
from recnix.protocol.connection import Event
from recnix.protocol.nar import Contents, File, FileEnd, NarParser
from recnix.protocol.stderr import Next
from recnix.protocol.wire import SERVER_MINOR_DEFAULT
from recnix.remote.remotetrust import (
    MAX_DRV_BYTES,
    TrustCheck,
    UntrustedPath,
    builder_trusted,
    ssh_destination,
)
from recnix.store.aio import READ_CHUNK, next_event, serve_requests
from recnix.store.seam import StoreError, closure_infos, topo_order
from recnix.store.upstream import Upstream, UpstreamError

REAL_SSH_ENV = "RECNIX_REAL_SSH"
BUILD_OPS = (Op.BUILD_DERIVATION, Op.BUILD_PATHS, Op.BUILD_PATHS_WITH_RESULTS)
# BuildResult statuses with valid outputs: Built, Substituted, AlreadyValid,
# ResolvesToAlreadyValid.


class ProxyError(Exception):
    """A step of the proxy failed; the text is what build-remote reports."""


def remote_command(args: list[str]) -> list[str]:
    """The remote command of an ssh argument list as Nix builds it: the words after
    ``--`` (Nix >= 2.20) or the last argument split like a shell would (before)."""
    if "--" in args:
        return args[args.index("--") + 1 :]
    if len(args) < 2:
        return []
    try:
        return shlex.split(args[-1])
    except ValueError:
        return []


def is_worker_session(args: list[str]) -> bool:
    """Whether ``ssh ARGS`` starts a worker-protocol session (``nix-daemon --stdio``)."""
    opts = args[: args.index("--")] if "--" in args else args
    if "-M" in opts or "-O" in opts:
        return False
    words = remote_command(args)
    return bool(words) and os.path.basename(words[0]) == "nix-daemon" and "--stdio" in words


STARTED_COMMAND = "LocalCommand=echo started"


def announces_start(args: list[str]) -> bool:
    """Whether Nix asked ssh to print ``started`` on stdout once connected (Nix >= 2.20:
    ``-oPermitLocalCommand=yes -oLocalCommand=echo started``), before the session's
    bytes: the proxy then reads that line from the real ssh and passes it on."""
    opts = args[: args.index("--")] if "--" in args else args
    return any(
        a == f"-o{STARTED_COMMAND}" or (a == STARTED_COMMAND and i and opts[i - 1] == "-o")
        for i, a in enumerate(opts)
    )


def real_ssh() -> str:
    """The ssh to run: ``$RECNIX_REAL_SSH``, else the first ``ssh`` on PATH that is not
    this shim's."""
    named = os.environ.get(REAL_SSH_ENV)
    if named:
        return named
    here = Path(__file__).resolve().parent / "sshshim"
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    rest = [d for d in dirs if Path(d).resolve() != here]
    found = shutil.which("ssh", path=os.pathsep.join(rest))
    if found is None:
        raise ProxyError("recnix ssh proxy: no ssh on PATH (set RECNIX_REAL_SSH)")
    return found


def opted_in(drv_path: str) -> bool:
    """Whether the local ``.drv`` at ``drv_path`` requires recnix (False if unreadable)."""
    try:
        drv = read_derivation(drv_path)
    except (OSError, DerivationError):
        return False
    return bool(drv.declared_system_features & OPT_IN_FEATURES)


async def open_builder(ssh: str, args: list[str], client_minor: int) -> Upstream:
    """Start ``ssh ARGS`` (the real ssh, to the builder's ``nix-daemon --stdio``) and
    handshake at ``client_minor`` (no SetOptions: build-remote sends its own)."""
    process = await asyncio.create_subprocess_exec(
        ssh,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=READ_CHUNK * 4,
    )
    assert process.stdout is not None
    if announces_start(args):
        line = await process.stdout.readline()
        if line != b"started\n":
            process.kill()
            await process.wait()
            raise UpstreamError(
                f"ssh did not report the connection as started (first line: {line!r})"
            )
    return await Upstream.over_process(process, client_minor, "the builder")


class Proxy:
    """One proxied session: build-remote on stdin/stdout, the builder over ssh."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.server: ServerConnection | None = None
        self.builder: Upstream | None = None
        self.host = "the builder"
        self._local: Upstream | None = None

    # -- build-remote's side

    async def flush_server(self) -> None:
        assert self.server is not None
        data = self.server.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def server_event(self) -> Event:
        assert self.server is not None
        return await next_event(self.server, self.reader, self.flush_server)

    async def say(self, text: str) -> None:
        """A log line for build-remote (shown in the client's build log)."""
        assert self.server is not None
        self.server.send_log(Next(text + "\n"))
        await self.flush_server()

    # -- the session

    async def run(self, ssh: str, args: list[str]) -> int:
        """Open the builder, then serve build-remote at the builder's protocol minor.

        A Nix client sends its version only after the server's, so the builder's
        (negotiated at recnix's highest) is offered: both ends then use the same minor
        unless build-remote is older than the builder (the codec converts)."""
        self.host = ssh_destination(args) or "the builder"
        try:
            self.builder = await open_builder(ssh, args, SERVER_MINOR_DEFAULT)
        except (UpstreamError, ProtocolError, OSError) as e:
            raise ProxyError(
                f"no worker-protocol session with {self.host} through `{ssh}`: {e} "
                "(see ssh's messages above)"
            ) from e
        if announces_start(args):
            self.writer.write(b"started\n")
            await self.writer.drain()
        hs = self.builder.handshake
        assert hs is not None
        self.server = ServerConnection(
            server_minor=hs.minor, nix_version=hs.nix_version or "2.8.0", trust=hs.trust
        )
        try:
            await self.serve()
        finally:
            await self.builder.close()
            if self._local is not None:
                await self._local.close()
        return 0

    async def serve(self) -> None:
        assert self.builder is not None
        await serve_requests(self.server_event, self.answer, self.flush_server)

    async def answer(self, ev: Event) -> None:
        """One event of the server loop: the handshake, or a request to forward."""
        if isinstance(ev, HandshakeDone):
            return
        if not isinstance(ev, Request):
            raise ProtocolError(f"unexpected {type(ev).__name__} from build-remote")
        await self.forward(ev)

    async def forward(self, req: Request) -> None:
        """Forward one request, its stream and the builder's answer."""
        builder = self.builder
        assert builder is not None and self.server is not None
        spec = op_spec(req.op)
        kind = spec.stream(self.server.minor)
        if kind in (StreamKind.TUNNEL, StreamKind.TUNNEL_NAR):
            raise ProtocolError(
                f"recnix ssh proxy: {spec.op.name} with a {kind.value} stream is not supported"
            )
        if req.op == Op.BUILD_DERIVATION and opted_in(req.args["drv_path"]):
            await self.build_opted_in(req)
            return
        builder.conn.send_request(req.op, req.args)
        await builder.flush()
        if kind is StreamKind.NONE:
            await self.relay_answer(req)
            return
        answer = asyncio.ensure_future(self.relay_answer(req))
        try:
            while True:
                ev = await self.server_event()
                if isinstance(ev, Data):
                    builder.conn.send_data(ev.data)
                    await builder.flush()
                elif isinstance(ev, EndOfData):
                    builder.conn.send_end_of_data()
                    await builder.flush()
                    break
                else:
                    raise ProtocolError(f"unexpected {type(ev).__name__} in a request's stream")
        except BaseException:
            answer.cancel()
            raise
        await answer

    async def relay_until_reply(self) -> Reply | None:
        """Pass the builder's log messages to build-remote up to its reply; None: the
        builder answered with an error, passed on too."""
        builder = self.builder
        server = self.server
        assert builder is not None and server is not None
        while True:
            ev = await builder.next_event()
            if isinstance(ev, Log):
                server.send_log(ev.msg)
                await self.flush_server()
            elif isinstance(ev, ErrorReply):
                server.send_log(ev.error)
                await self.flush_server()
                return None
            elif isinstance(ev, Reply):
                return ev
            else:
                raise ProtocolError(f"unexpected {type(ev).__name__} from {self.host}")

    async def build_opted_in(self, req: Request) -> None:
        """BuildDerivation of an opted-in derivation: copy its .drv closure to the
        builder, build it there from the .drv (BuildPaths, which a client the builder
        does not trust may send too), fetch the outputs' closure, answer build-remote
        with the BuildResult it expects."""
        builder = self.builder
        server = self.server
        assert builder is not None and server is not None
        drv_path = req.args["drv_path"]
        try:
            await self.send_drv_closure(drv_path)
        except (StoreError, ProxyError, OSError) as e:
            await self.fail(
                f"recnix on this machine could not copy the .drv closure of {drv_path} "
                f"to {self.host} before building it there: {e}"
            )
            return
        start = int(time.time())
        target = DerivedPath(drv_path, sorted(req.args["drv"].outputs))
        builder.conn.send_request(
            Op.BUILD_PATHS, {"paths": [target], "build_mode": req.args["build_mode"]}
        )
        await builder.flush()
        if await self.relay_until_reply() is None:
            return
        try:
            await self.fetch_closure(req)
        except (StoreError, ProxyError, OSError) as e:
            await self.fail(
                f"recnix on this machine could not copy the closure of the outputs of "
                f"{drv_path}, built on {self.host}, into this machine's store: {e}"
            )
            return
        mark_remote_builds([drv_path])
        result = BuildResult(status=0, times_built=1, start_time=start, stop_time=int(time.time()))
        server.send_reply(Op.BUILD_DERIVATION, result)
        await self.flush_server()

    async def relay_answer(self, req: Request) -> None:
        """The builder's log messages and reply (or error) for ``req``, to build-remote."""
        builder = self.builder
        server = self.server
        assert builder is not None and server is not None
        ev = await self.relay_until_reply()
        if ev is None:
            return
        if req.op in BUILD_OPS and self.built(req.op, ev.value):
            try:
                await self.fetch_closure(req)
            except (StoreError, ProxyError, OSError) as e:
                await self.fail(
                    f"recnix on this machine could not copy the closure of the outputs built "
                    f"on {self.host} into this machine's store: {e}"
                )
                return
            if req.op != Op.BUILD_DERIVATION:
                mark_remote_builds([dp.path for dp in req.args["paths"] if dp.outputs])
        server.send_reply(ev.op, ev.value)
        await self.flush_server()
        if op_spec(ev.op).reply_stream is StreamKind.NAR:
            while True:
                ev2 = await builder.next_event()
                if isinstance(ev2, Data):
                    server.send_raw(ev2.data)
                    await self.flush_server()
                elif isinstance(ev2, EndOfData):
                    return
                else:
                    raise ProtocolError(f"unexpected {type(ev2).__name__} in a NAR")

    async def fail(self, message: str) -> None:
        """Answer build-remote's current op with ``message``; end the session if a
        connection was left in the middle of an op (e.g. a NAR half read)."""
        assert self.server is not None and self.builder is not None
        print(message, file=sys.stderr)
        self.server.send_error(message)
        await self.flush_server()
        if self._local is not None and not self._local.reusable:
            await self._local.close()
            self._local = None
        if not self.builder.reusable:
            raise ProxyError(f"{message} (the connection to {self.host} is out of step: closed)")

    @staticmethod
    def built(op: Op, value: Any) -> bool:
        if op == Op.BUILD_DERIVATION:
            return value.status in (
                0,
                1,
                2,
                13,
            )  # Built, Substituted, AlreadyValid, ResolvesToAlreadyValid
        if op == Op.BUILD_PATHS_WITH_RESULTS:
            return all(build_succeeded(r.result.status) for r in value)
        return True

    # -- the builder's store, by our own requests between build-remote's

    async def builder_call(self, op: Op, args: dict[str, Any], data: Any = None) -> Any:
        assert self.builder is not None
        return await self.builder.call(op, args, data=data)

    async def builder_nar(self, path: str) -> AsyncIterator[bytes]:
        assert self.builder is not None
        async for chunk in self.builder.nar_from_path(path):
            yield chunk

    async def local(self) -> Upstream:
        """The client's own nix-daemon (as root: trusted)."""
        if self._local is None:
            self._local = await Upstream.connect("daemon")
        return self._local

    # -- before BuildDerivation

    async def send_drv_closure(self, drv_path: str) -> None:
        """Copy the closure of the opted-in ``drv_path`` the builder lacks to it."""
        if not opted_in(drv_path):
            return
        local = await self.local()
        infos = await closure_infos(local.query_path_info, [drv_path])
        valid = set(await self.builder_call(Op.QUERY_VALID_PATHS, {"paths": sorted(infos)}))
        missing = {p: i for p, i in infos.items() if p not in valid}
        if not missing:
            return
        await self.say(
            f"recnix: copying {len(missing)} paths of the closure of {drv_path} to {self.host}"
        )
        for path in topo_order(missing):
            info = missing[path]
            if path.endswith(".drv") and (info.ca or "").startswith("text:"):
                await self.builder_call(
                    Op.ADD_TO_STORE,
                    {
                        "name": path.split("/")[-1][33:],
                        "ca_method": "text:sha256",
                        "references": sorted(info.references),
                        "repair": False,
                    },
                    data=[Path(path).read_bytes()],
                )
            else:
                assert self.builder is not None
                await self.builder.add_to_store_nar(
                    ValidPathInfo(path, info), local.nar_from_path(path), dont_check_sigs=True
                )

    # -- after a build

    async def output_paths(self, req: Request) -> set[str]:
        """The outputs of what build-remote sent: from the derivation it sent, or from this
        machine's ``.drv``; the builder is asked only for outputs no ``.drv`` fixes."""
        if req.op == Op.BUILD_DERIVATION:
            return {o.path for o in req.args["drv"].outputs.values() if o.path}
        outs: set[str] = set()
        for dp in req.args["paths"]:
            if dp.outputs is None:
                continue
            try:
                known = {n: o.path for n, o in read_derivation(dp.path).outputs.items()}
            except (OSError, DerivationError):
                known = {}
            wanted = [n for n in known if dp.outputs == ["*"] or n in dp.outputs]
            if known and all(known[n] for n in wanted):
                outs.update(known[n] for n in wanted if known[n])
                continue
            omap = await self.builder_call(Op.QUERY_DERIVATION_OUTPUT_MAP, {"drv_path": dp.path})
            for name, path in omap.items():
                if path and (dp.outputs == ["*"] or name in dp.outputs):
                    outs.add(path)
        return outs

    async def fetch_closure(self, req: Request) -> None:
        """Add the built outputs' closure minus the outputs to the client's store, each
        path only if recnix.remote.remotetrust admits it (else nothing is imported).

        Walks the builder's references only into paths this machine lacks (a valid
        path's closure is valid): one round trip per output and per missing path."""
        outputs = await self.output_paths(req)
        if not outputs:
            return
        local = await self.local()
        infos: dict[str, PathInfo] = {}
        todo = sorted(outputs)
        while todo:
            for path in todo:
                info = await self.builder_call(Op.QUERY_PATH_INFO, {"path": path})
                if info is None:
                    raise ProxyError(f"{path} is not valid on {self.host}")
                infos[path] = info
            refs = {r for p in todo for r in infos[p].references} - infos.keys() - outputs
            have = set(await local.query_valid_paths(refs)) if refs else set()
            todo = sorted(refs - have)
        missing = {p: i for p, i in infos.items() if p not in outputs}
        if not missing:
            return
        check = self.trust_check()
        order = topo_order(missing)
        try:
            admitted = {path: await check.admit(path, missing[path]) for path in order}
        except UntrustedPath as e:
            raise ProxyError(str(e)) from None
        await self.say(
            f"recnix: copying {len(missing)} paths the outputs built on {self.host} "
            "refer to into this machine's store"
        )
        for path in order:
            try:
                await local.add_to_store_nar(
                    ValidPathInfo(path, missing[path]),
                    self.builder_nar(path),
                    dont_check_sigs=not admitted[path].check_sigs,
                )
            except UpstreamError as e:
                raise ProxyError(f"adding {path} ({admitted[path].reason}): {e}") from e

    def trust_check(self) -> TrustCheck:
        """How far this session's builder is trusted (recnix.remote.remotetrust)."""
        from recnix.config.loader import load_config

        trusted = load_config().settings.remote.trusted_builders
        return TrustCheck(
            self.host,
            builder_trusted(self.host, trusted),
            local_public_keys,
            self.read_drv,
            self.valid_here,
        )

    async def valid_here(self, path: str) -> bool:
        return await (await self.local()).is_valid_path(path)

    async def read_drv(self, path: str) -> bytes:
        """A ``.drv``'s contents: from this store if valid here, else from the builder
        (unchecked: recnix.remote.remotetrust checks them against the path)."""
        if await self.valid_here(path):
            return Path(path).read_bytes()
        if await self.builder_call(Op.QUERY_PATH_INFO, {"path": path}) is None:
            raise UntrustedPath(f"{path} is not valid on {self.host}")
        return await single_file(self.builder_nar(path), path)


async def single_file(chunks: AsyncIterator[bytes], path: str) -> bytes:
    """The contents of a NAR holding one regular file (a ``.drv``), at most MAX_DRV_BYTES;
    UntrustedPath otherwise (the whole NAR is read: the connection stays in step)."""
    parts: list[bytes] = []
    problem: str | None = None

    def on_event(ev: object) -> None:
        nonlocal problem
        if isinstance(ev, Contents):
            parts.append(ev.data)
        elif isinstance(ev, File):
            if ev.path != "" or ev.size > MAX_DRV_BYTES:
                problem = problem or f"{path} is not a file of at most {MAX_DRV_BYTES} bytes"
        elif not isinstance(ev, FileEnd):
            problem = problem or f"{path} is not a regular file"

    parser = NarParser(on_event)
    try:
        async for chunk in chunks:
            if not parser.done:
                parser.feed(chunk)
    except ProtocolError as e:
        problem = problem or f"{path}: {e}"
    if problem is None and not parser.done:
        problem = f"{path}: incomplete NAR"
    if problem is not None:
        raise UntrustedPath(problem)
    return b"".join(parts)


def local_public_keys() -> dict[str, bytes]:
    """The keys this machine's Nix trusts (its nix.conf, as ``nix show-config`` reads it)."""
    from recnix.formats.signatures import trusted_keys
    from recnix.store.nixsettings import nix_settings

    return trusted_keys(nix_settings())


def mark_remote_builds(drv_paths: list[str]) -> None:
    """Tell this machine's recnix (its post-build hook, which Nix runs here after a remote
    build too) that these opted-in builds ran remotely, closure fetched: not a lost session."""
    wanted = [d for d in drv_paths if opted_in(d)]
    if not wanted:
        return
    try:
        from recnix.config.loader import load_config
        from recnix.remote.guards import mark_remote_build

        state_dir = load_config().state_dir
        for drv in wanted:
            mark_remote_build(state_dir, drv)
    except Exception as e:  # noqa: BLE001 - only the post-build hook's message suffers
        print(
            f"recnix ssh proxy: cannot mark {' '.join(wanted)} as built remotely: {e}",
            file=sys.stderr,
        )


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK * 4)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0, closefd=False)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(1, "wb", 0, closefd=False)
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def _proxy_main(ssh: str, args: list[str]) -> int:
    reader, writer = await _stdio()
    proxy = Proxy(reader, writer)
    try:
        return await proxy.run(ssh, args)
    except (ProtocolError, StoreError, ProxyError, asyncio.IncompleteReadError) as e:
        print(f"recnix ssh proxy for {proxy.host}: session ended: {e}", file=sys.stderr)
        return 1
    except (ConnectionError, BrokenPipeError) as e:
        print(f"recnix ssh proxy for {proxy.host}: connection lost: {e}", file=sys.stderr)
        return 1


def main(args: list[str]) -> int:
    """``ssh ARGS``: proxy a worker-protocol session, exec the real ssh for anything else."""
    try:
        ssh = real_ssh()
    except ProxyError as e:
        print(e, file=sys.stderr)
        return 255
    if not is_worker_session(args):
        os.execv(ssh, ["ssh", *args])
    return asyncio.run(_proxy_main(ssh, args))
