#!/usr/bin/env python3
"""Codec throughput: QueryPathInfo replies (messages/s) and a 256 MiB NAR streamed
through ServerConnection, framed and plain (MB/s), with peak RSS.

Run: .venv/bin/python bench/codec_bench.py [--mib 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from recnix.protocol import (
    NEED_DATA,
    ClientConnection,
    Data,
    EndOfData,
    Op,
    PathInfo,
    Request,
    ServerConnection,
    schema,
    wire,
)

CHUNK = 1 << 16
P = "/nix/store/" + "a" * 32 + "-bench"


def rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB: VmHWM of its memory map
    (getrusage's ru_maxrss would keep the peak of the process this one was forked
    from: Linux carries it over fork and exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def handshake(minor: int) -> tuple[ClientConnection, ServerConnection]:
    client = ClientConnection(minor)
    server = ServerConnection(35)
    client.initiate()
    for _ in range(4):
        data = client.data_to_send()
        if data:
            server.receive_data(data)
        while server.next_event() is not NEED_DATA:
            pass
        data = server.data_to_send()
        if data:
            client.receive_data(data)
        while client.next_event() is not NEED_DATA:
            pass
    return client, server


def bench_path_info(n: int) -> None:
    info = PathInfo(
        "/nix/store/" + "d" * 32 + "-x.drv",
        "ab" * 32,
        [f"/nix/store/{c * 32}-dep" for c in "bcdfg"],
        1700000000,
        123456,
        False,
        ["cache.nixos.org-1:" + "A" * 86 + "=="],
        None,
    )
    ctx = wire.Ctx(35)
    reply = schema.OPS[Op.QUERY_PATH_INFO].reply
    assert reply is not None
    t0 = time.perf_counter()
    for _ in range(n):
        data = wire.encode(reply, info, ctx)
        wire.decode_all(reply, data, ctx)
    dt = time.perf_counter() - t0
    print(f"QueryPathInfo reply, codec only:    {n / dt:10.0f} messages/s (encode+decode)")

    client, server = handshake(35)
    t0 = time.perf_counter()
    for _ in range(n):
        client.send_request(Op.QUERY_PATH_INFO, {"path": P})
        server.send_reply(Op.QUERY_PATH_INFO, info)
        client.receive_data(server.data_to_send())
        client.next_event()
    server.receive_data(client.data_to_send())
    got = 0
    while (ev := server.next_event()) is not NEED_DATA:
        got += isinstance(ev, Request)
    dt = time.perf_counter() - t0
    assert got == n
    print(f"QueryPathInfo round trip, both roles: {n / dt:8.0f} requests+replies/s")


def nar_pieces(size: int) -> Iterator[bytes]:
    """A NAR of one regular file of ``size`` bytes, generated in CHUNK pieces."""
    head = bytearray()
    for token in [b"nix-archive-1", b"(", b"type", b"regular", b"contents"]:
        wire.write_bytes(head, token)
    head += wire.u64(size)
    yield bytes(head)
    block = b"\x5a" * CHUNK
    left = size
    while left:
        n = min(left, CHUNK)
        yield block[:n]
        left -= n
    tail = bytearray(wire.ZEROS[: (-size) % 8])
    wire.write_bytes(tail, b")")
    yield bytes(tail)


def bench_stream(mib: int, minor: int, framed: bool) -> None:
    size = mib << 20
    client, server = handshake(minor)
    args = {"path": P, "deriver": None, "nar_hash": "ab" * 32, "nar_size": size, "ca": None}
    client.send_request(Op.ADD_TO_STORE_NAR, args)
    server.receive_data(client.data_to_send())
    received = 0
    done = False
    t0 = time.perf_counter()
    for piece in nar_pieces(size):
        client.send_data(piece)
        server.receive_data(client.data_to_send())
        while (ev := server.next_event()) is not NEED_DATA:
            if isinstance(ev, Data):
                received += len(ev.data)
            elif isinstance(ev, EndOfData):
                done = True
    client.send_end_of_data()
    tail = client.data_to_send()
    if tail:
        server.receive_data(tail)
    while (ev := server.next_event()) is not NEED_DATA:
        if isinstance(ev, Data):
            received += len(ev.data)
        elif isinstance(ev, EndOfData):
            done = True
    dt = time.perf_counter() - t0
    assert done and received > size, (done, received)
    kind = "framed (1.35)" if framed else "plain NAR, parsed (1.20)"
    mbs = received / dt / 1e6
    print(f"{mib} MiB NAR stream, {kind:24}: {mbs:8.1f} MB/s, peak RSS {rss_mib():.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="size of the streamed NAR")
    parser.add_argument("--messages", type=int, default=50000)
    opts = parser.parse_args()
    bench_path_info(opts.messages)
    bench_stream(opts.mib, 35, framed=True)
    bench_stream(opts.mib, 20, framed=False)
    peak = rss_mib()
    print(f"peak RSS overall: {peak:.1f} MiB ({'OK' if peak < 64 else 'OVER'} the 64 MiB bound)")
    return 0 if peak < 64 else 1


if __name__ == "__main__":
    sys.exit(main())
