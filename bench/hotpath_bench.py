#!/usr/bin/env python3
"""Where a QueryPathInfo round trip's microseconds go in the service, without Nix.

Serves an in-memory session (tests/unit/fakes.py: the world of the restricted
store's unit tests) through the real ``ConnectionHandler`` → ``RestrictedStore``
and measures, for QueryPathInfo and IsValidPath of an allowed path:

- ``handler``: one request fed to ``ConnectionHandler.on_data`` and its reply
  taken from the transport (the service's own Python work per request, CPU
  time);
- ``socket``: round trips over a Unix socket to the handler on an asyncio loop
  (uvloop too when installed), from a forked client sending pre-encoded
  requests with blocking calls, beside the floor of the same loop answering
  with a constant reply (what any asyncio server pays for the round trip);
  wall time per trip and the serving process's CPU time per trip.

``--profile`` prints cProfile's top functions of the ``handler`` loop.
Run: ``.venv/bin/python bench/hotpath_bench.py [--n 20000] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recnix.daemon.connection import ConnectionHandler, Peer  # noqa: E402
from recnix.daemon.session import ClientProtocol  # noqa: E402
from recnix.protocol import ClientConnection, Op, Reply  # noqa: E402
from recnix.protocol.connection import Phase  # noqa: E402
from recnix.store.restricted import RestrictedStore, censor  # noqa: E402
from scripts.fuzz_session import Transport, handshake_bytes, new_world  # noqa: E402

MINOR = 35


def request_bytes(op: Op, path: str) -> bytes:
    _, proto = handshake_bytes(MINOR)
    client = ClientConnection(client_minor=MINOR)
    client.ctx = proto.ctx
    client._state = Phase.IDLE  # noqa: SLF001
    client.send_request(op, {"path": path})
    return client.data_to_send()


def decode_reply(op: Op, path: str, data: bytes) -> Any:
    _, proto = handshake_bytes(MINOR)
    client = ClientConnection(client_minor=MINOR)
    client.ctx = proto.ctx
    client._state = Phase.IDLE  # noqa: SLF001
    client.send_request(op, {"path": path})
    client.data_to_send()
    client.receive_data(data)
    ev = client.next_event()
    assert isinstance(ev, Reply), ev
    return ev.value


def new_handler(transport: Any) -> tuple[ConnectionHandler, Any, Any]:
    world, session = new_world()
    h = ConnectionHandler(session, transport, Peer(os.getpid(), 0, 0))  # type: ignore[arg-type]
    h.store = RestrictedStore(session.store, session, h)
    return h, world, session


def handler_loop(n: int, op: Op, profile: bool) -> float:
    transport = Transport()
    made = new_handler(transport)
    return asyncio.run(_handler_loop(n, op, profile, transport, *made))


async def _handler_loop(
    n: int, op: Op, profile: bool, transport: Transport, h: Any, world: Any, session: Any
) -> float:
    if op is Op.QUERY_PATH_INFO:  # the session knows the path's info (an input's)
        session.path_infos[world.input] = censor(await session.store.query_path_info(world.input))
    task = asyncio.ensure_future(h.run())
    hello, _ = handshake_bytes(MINOR)
    h.on_data(hello)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    req = request_bytes(op, world.input)
    transport.out.clear()
    h.on_data(req)
    for _ in range(5):
        await asyncio.sleep(0)
    value = decode_reply(op, world.input, bytes(transport.out))
    assert value not in (None, False), value
    out = transport.out
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.process_time()  # CPU time: the machine may be loaded
    for _ in range(n):
        h.on_data(req)
        del out[:]
    dt = (time.process_time() - t0) / n
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    h.on_lost()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return dt


# -- over a socket


class _Proto(ClientProtocol):
    """The service's ClientProtocol, with the handler made by ``make`` (no Session)."""

    def __init__(self, make: Any) -> None:
        self.make = make
        self.handler: ConnectionHandler | None = None

    def connection_made(self, transport: Any) -> None:
        self.handler = self.make(transport)


class _Constant(asyncio.Protocol):
    """The floor: answer every request with the same bytes."""

    def __init__(self, reply: bytes, hello_reply: bytes) -> None:
        self.reply = reply
        self.hello_reply = hello_reply
        self.first = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.first:
            self.first = False
            self.transport.write(self.hello_reply)
        else:
            self.transport.write(self.reply)


def client(sock: socket.socket, hello: bytes, req: bytes, reply_len: int, n: int) -> float:
    """Blocking client: handshake bytes, then ``n`` round trips; seconds per trip."""
    sock.sendall(hello)
    time.sleep(0.05)
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        pass
    sock.setblocking(True)

    def trip() -> None:
        sock.sendall(req)
        got = 0
        while got < reply_len:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            got += len(chunk)

    for _ in range(200):
        trip()
    t0 = time.perf_counter()
    for _ in range(n):
        trip()
    return (time.perf_counter() - t0) / n


def socket_round(loop_kind: str, op: Op, n: int, floor: bool, cpu: list[float]) -> float:
    """Round trips of ``op`` served by a fresh loop, from a forked client (seconds per
    trip; the server's CPU seconds per trip appended to ``cpu``)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    hello, _ = handshake_bytes(MINOR)
    transport = Transport()
    h, world, session = new_handler(transport)
    req = request_bytes(op, world.input)

    async def setup() -> float:
        if op is Op.QUERY_PATH_INFO:
            await session.closure([world.input])
        task = asyncio.ensure_future(h.run())
        h.on_data(hello)
        for _ in range(3):
            await asyncio.sleep(0)
        hello_reply = bytes(transport.out)
        transport.out.clear()
        h.on_data(req)
        for _ in range(5):
            await asyncio.sleep(0)
        reply = bytes(transport.out)
        h.on_lost()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

        loop = asyncio.get_running_loop()

        def make(tr: Any) -> ConnectionHandler:
            hh = ConnectionHandler(session, tr, Peer(os.getpid(), 0, 0))  # type: ignore[arg-type]
            hh.store = RestrictedStore(session.store, session, hh)
            t = asyncio.ensure_future(hh.run())
            tasks.append(t)
            return hh

        tasks: list[asyncio.Task] = []
        factory = (lambda: _Constant(reply, hello_reply)) if floor else (lambda: _Proto(make))
        tr, _ = await loop.create_unix_connection(factory, sock=parent)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            status = 1
            try:
                sec = client(child, hello, req, len(reply), n)
                os.write(w, struct.pack("d", sec))
                status = 0
            finally:
                os._exit(status)
        os.close(w)
        child.close()
        cpu0 = time.process_time()
        data = await loop.run_in_executor(None, lambda: os.read(r, 8))
        cpu.append((time.process_time() - cpu0) / (n + 200))
        await loop.run_in_executor(None, os.waitpid, pid, 0)
        os.close(r)
        tr.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return struct.unpack("d", data)[0]

    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(setup())
    return asyncio.run(setup())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="requests per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the handler loop")
    ap.add_argument("--no-socket", action="store_true")
    args = ap.parse_args()
    import logging

    logging.disable(logging.CRITICAL)
    ops = [Op.QUERY_PATH_INFO, Op.IS_VALID_PATH]
    if args.profile:
        for op in ops:
            print(f"== {op.name}")
            handler_loop(args.n, op, True)
        return 0
    for op in ops:
        vals = [handler_loop(args.n, op, False) for _ in range(args.rounds)]
        print(f"handler {op.name:18} {1e6 * statistics.median(vals):6.2f} µs CPU/request")
    if args.no_socket:
        return 0
    kinds = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        kinds.append("uvloop")
    except ImportError:
        pass
    n = max(args.n // 4, 1000)
    for kind in kinds:
        for op in ops:
            ours, floor, cpu_ours, cpu_floor = [], [], [], []
            for _ in range(args.rounds):
                ours.append(socket_round(kind, op, n, False, cpu_ours))
                floor.append(socket_round(kind, op, n, True, cpu_floor))
            ratio = statistics.median(a / b for a, b in zip(ours, floor, strict=True))
            print(
                f"socket  {kind:8} {op.name:18} {1e6 * statistics.median(ours):6.2f} µs "
                f"round trip, floor {1e6 * statistics.median(floor):6.2f} µs, "
                f"ratio {ratio:.2f}; server CPU {1e6 * statistics.median(cpu_ours):5.2f} µs, "
                f"floor {1e6 * statistics.median(cpu_floor):5.2f} µs"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
