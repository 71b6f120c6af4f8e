#!/usr/bin/env python3
"""Fuzz a session's protocol entry in-process: recnix.daemon.session.ConnectionHandler
(decode -> RestrictedStore -> encode) over the in-memory store of tests/unit/fakes.py.

Each case is one client connection: a handshake (any client minor 10..37) and a
few requests — valid ones over input, added, built, foreign and malformed paths,
hostile ones (leaking .drv texts, unserved ops, repair, huge lengths), and byte
mutations of them (flips, truncation, splices, huge length words) — fed in
random pieces, then end of input. A case fails if the handler raises
(crash) or does not finish within --case-timeout seconds (hang). Every
--check-every cases, and at the end, a good client must still get correct
answers from the same session. Deterministic in --seed.

    .venv/bin/python scripts/fuzz_session.py --cases 1000000 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recnix.daemon.connection import ConnectionHandler, Peer  # noqa: E402
from recnix.formats.derivation import to_aterm_bytes  # noqa: E402
from recnix.protocol import (  # noqa: E402
    NEED_DATA,
    ClientConnection,
    ClientOptions,
    DerivedPath,
    ErrorReply,
    HandshakeDone,
    Op,
    PathInfo,
    Reply,
    ServerConnection,
    ValidPathInfo,
    encode_multiple_entry,
    encode_multiple_header,
)
from recnix.protocol.connection import Phase  # noqa: E402
from recnix.store.restricted import RestrictedStore  # noqa: E402
from tests.unit.fakes import FakeSession, nar_of, store_path  # noqa: E402
from tests.unit.store.test_restricted import World, drv  # noqa: E402

SERVICE = SimpleNamespace(
    config=SimpleNamespace(policy={"forward-build-logs": True}), hooks_optional=True
)


class Transport:
    """Collects what the handler writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def handshake_bytes(minor: int) -> tuple[bytes, ClientConnection]:
    """What a client of ``minor`` sends for the handshake, and the client after it."""
    client = ClientConnection(client_minor=minor)
    server = ServerConnection(nix_version="2.8.0")
    client.initiate()
    sent = bytearray()
    for _ in range(20):
        data = client.data_to_send()
        sent += data
        server.receive_data(data)
        while server.next_event() is not NEED_DATA:
            pass
        client.receive_data(server.data_to_send())
        ev = client.next_event()
        if isinstance(ev, HandshakeDone):
            while (ev := client.next_event()) is not NEED_DATA:
                pass
            return bytes(sent + client.data_to_send()), client
    raise RuntimeError(f"handshake of minor {minor} did not finish")


class Corpus:
    """Valid and hostile requests over the paths of one World."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.w = world
        self.rng = rng
        leak = drv("leak", [world.src, world.foreign])
        self.leak_text = to_aterm_bytes(leak)
        self.leak_src = world.store.put_drv(leak, "leak", refs=False)
        world.session.allowed.add(self.leak_src)  # route 1: a .drv-named input source
        self.paths = [
            world.input,
            world.src,
            world.added,
            world.built,
            world.built_drv,
            world.input_drv,
            world.foreign,
            world.foreign_drv,
            self.leak_src,
            world.session.drv_path,
            "/nix/store/../etc/passwd",
            "/nix/store/short",
            "relative",
            "",
            "/nix/store/" + "a" * 32 + "-x\0y",
        ]
        self.minors = [10, 16, 17, 21, 22, 23, 25, 27, 29, 32, 35, 37]
        self.hello = {m: handshake_bytes(m) for m in self.minors}

    def path(self) -> str:
        return self.rng.choice(self.paths)

    def request(self, client: ClientConnection) -> None:
        """Queue one request (and its stream) on ``client``."""
        r, p = self.rng, self.path
        minor = client.ctx.minor if client.ctx else 35
        op = r.choice(OPS)
        text = r.choice([b"hello", self.leak_text, b"Derive(", b"x" * r.randrange(0, 3000)])
        refs = [p() for _ in range(r.randrange(0, 3))]
        if op in (Op.BUILD_PATHS, Op.BUILD_PATHS_WITH_RESULTS, Op.QUERY_MISSING):
            targets = [DerivedPath(p(), r.choice([None, ["out"], ["*"]])) for _ in range(2)]
            key = "targets" if op is Op.QUERY_MISSING else "paths"
            args = {key: targets, "build_mode": r.choice([0, 0, 1, 2])}
        elif op is Op.QUERY_VALID_PATHS or op is Op.QUERY_SUBSTITUTABLE_PATHS:
            args = {"paths": [p() for _ in range(3)], "substitute": False}
        elif op is Op.QUERY_SUBSTITUTABLE_PATH_INFOS:
            args = {"paths": {p(): None} if minor >= 22 else [p()]}
        elif op is Op.ADD_TEXT_TO_STORE:
            args = {"name": r.choice(["t", "leak.drv", "x.drv"]), "text": text, "references": refs}
        elif op is Op.ADD_TO_STORE:
            ca = r.choice(["fixed:sha256", "fixed:r:sha256", "text:sha256", "bogus"])
            args = {"name": r.choice(["f", "leak.drv"]), "ca_method": ca, "references": refs}
            args.update(repair=r.random() < 0.1)
            body = nar_of(text) if ca == "fixed:r:sha256" else text
            return self._with_stream(client, op, args, body)
        elif op is Op.ADD_TO_STORE_NAR:
            nar = nar_of(text)
            args = {
                "path": r.choice([store_path("n.drv", str(r.random())), p()]),
                "deriver": None,
                "nar_hash": "00" * 32,
                "references": refs,
                "registration_time": 0,
                "nar_size": len(nar),
                "ultimate": r.random() < 0.5,
                "sigs": [],
                "ca": None,
                "repair": r.random() < 0.1,
                "dont_check_sigs": r.random() < 0.5,
            }
            return self._with_stream(client, op, args, nar)
        elif op is Op.ADD_MULTIPLE_TO_STORE:
            nar = nar_of(text)
            info = ValidPathInfo(
                store_path("m.drv", str(r.random())), PathInfo(None, "00" * 32, refs, 0, len(nar))
            )
            body = encode_multiple_header(1) + encode_multiple_entry(info) + nar
            return self._with_stream(client, op, {"repair": False, "dont_check_sigs": False}, body)
        elif op is Op.SET_OPTIONS:
            overrides = r.choice([{}, {"sandbox": "false"}, {"build-hook": "/bin/sh"}])
            args = {"options": ClientOptions(overrides=overrides)}
        elif op is Op.VERIFY_STORE:
            args = {"check_contents": True, "repair": r.random() < 0.5}
        elif op is Op.COLLECT_GARBAGE:
            args = {"action": r.randrange(4), "paths": [p()], "ignore_liveness": 1, "max_freed": 0}
        elif op is Op.QUERY_PATH_FROM_HASH_PART:
            args = {"hash_part": "a" * 32}
        elif op is Op.ADD_SIGNATURES:
            args = {"path": p(), "sigs": ["k:abc"]}
        elif op is Op.EXPORT_PATH:
            args = {"path": p(), "sign": 0}
        elif op is Op.ADD_PERM_ROOT:
            args = {"path": p(), "gc_root": "/tmp/root"}
        elif op is Op.QUERY_DERIVATION_OUTPUT_MAP:
            args = {"drv_path": p()}
        elif op is Op.QUERY_REALISATION:
            args = {"id": "sha256:" + "0" * 64 + "!out"}
        elif op in (Op.SYNC_WITH_GC, Op.FIND_ROOTS, Op.OPTIMISE_STORE, Op.QUERY_ALL_VALID_PATHS):
            args = {}
        else:
            args = {"path": p()}
        client.send_request(op, args)

    def _with_stream(self, client: ClientConnection, op: Op, args: dict, body: bytes) -> None:
        client.send_request(op, args)
        cut = self.rng.randrange(1, len(body) + 1) if body else 0
        client.send_data(body[:cut])
        client.send_data(body[cut:])
        client.send_end_of_data()

    def case(self) -> bytes:
        """One connection's bytes: handshake, requests, perhaps mutated."""
        r = self.rng
        minor = r.choice(self.minors)
        hello, proto = self.hello[minor]
        client = ClientConnection(client_minor=minor)
        client.ctx = proto.ctx
        client._state = Phase.IDLE  # noqa: SLF001 - a client past its handshake, without replaying it
        out = bytearray(hello)
        for _ in range(r.randrange(1, 5)):
            try:
                self.request(client)
            except Exception:  # the encoder refused a value (e.g. a path): skip that one
                client._out.clear()  # noqa: SLF001
                continue
            out += client.data_to_send()
        if r.random() < 0.6:
            out = mutate(bytes(out), len(hello), r)
        return bytes(out)


def mutate(data: bytes, keep: int, r: random.Random) -> bytearray:
    """A few byte-level mutations, mostly after the first ``keep`` bytes."""
    b = bytearray(data)
    for _ in range(r.randrange(1, 4)):
        start = keep if r.random() < 0.9 and len(b) > keep else 0
        if len(b) <= start:
            b += r.randbytes(8)
            continue
        i = r.randrange(start, len(b))
        kind = r.randrange(7)
        if kind == 0:
            b[i] ^= 1 << r.randrange(8)
        elif kind == 1:
            del b[i:]
        elif kind == 2:
            b[i:i] = r.randbytes(r.randrange(1, 16))
        elif kind == 3:  # a huge or odd length/number word
            word = r.choice([2**64 - 1, 2**63, 2**32, 1 << 30, 0, 7, 46, 1000])
            b[i : i + 8] = struct.pack("<Q", word)
        elif kind == 4:
            j = r.randrange(start, len(b))
            b[i:i] = b[min(i, j) : max(i, j)][:4096]
        elif kind == 5:
            del b[i : i + r.randrange(1, 16)]
        else:
            b[i : i + 8] = struct.pack("<Q", r.choice(list(Op)).value)
    return b


OPS = [op for op in Op if op not in (Op.IMPORT_PATHS, Op.SUBMIT_OUTPUT, Op.ADD_TO_STORE_SCANNING)]
OPS = [
    op for op in OPS if op not in (Op.BUILD_DERIVATION, Op.REGISTER_DRV_OUTPUT, Op.ADD_BUILD_LOG)
]


class Crash(Exception):
    pass


async def serve_case(session: FakeSession, data: bytes, r: random.Random, timeout: float) -> str:
    """Serve one connection; 'ok', 'hang' or raises Crash."""
    transport = Transport()
    h = ConnectionHandler(session, transport, Peer(4242, 0, 0))  # type: ignore[arg-type]
    h.store = RestrictedStore(session.store, session, h)
    task = asyncio.ensure_future(h.run())
    pos = 0
    try:  # what the event loop's data_received would run; raising there is a crash too
        while pos < len(data):
            n = r.choice([len(data), r.randrange(1, 64), r.randrange(1, 4096)])
            h.on_data(data[pos : pos + n])
            pos += n
            await asyncio.sleep(0)
        h.on_data(b"")
    except Exception as e:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise Crash("on_data: " + "".join(traceback.format_exception(e))) from None
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        h.on_lost()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return "hang"
    exc = task.exception()
    await h.close()
    if exc is not None:
        raise Crash("".join(traceback.format_exception(exc)))
    return "ok"


async def good_client(session: FakeSession, world: World) -> None:
    """A well-behaved client gets the right answers (raises AssertionError if not)."""
    hello, proto = handshake_bytes(35)
    client = ClientConnection(client_minor=35)
    client.ctx = proto.ctx
    client._state = Phase.IDLE  # noqa: SLF001
    client.send_request(Op.IS_VALID_PATH, {"path": world.input})
    client.send_request(Op.IS_VALID_PATH, {"path": world.foreign})
    client.send_request(Op.QUERY_PATH_INFO, {"path": world.input})
    transport = Transport()
    h = ConnectionHandler(session, transport, Peer(4242, 0, 0))  # type: ignore[arg-type]
    h.store = RestrictedStore(session.store, session, h)
    task = asyncio.ensure_future(h.run())
    h.on_data(hello + client.data_to_send())
    h.on_data(b"")
    await asyncio.wait_for(task, 10)
    reader = ClientConnection(client_minor=35)
    reader.initiate()
    reader.receive_data(bytes(transport.out))
    events = []
    while (ev := reader.next_event()) is not NEED_DATA:
        if isinstance(ev, Reply | ErrorReply):
            events.append(ev)
        if len(events) == 3:
            break
        if isinstance(ev, HandshakeDone):
            reader.send_request(Op.IS_VALID_PATH, {"path": world.input})
            reader.send_request(Op.IS_VALID_PATH, {"path": world.foreign})
            reader.send_request(Op.QUERY_PATH_INFO, {"path": world.input})
    values = [getattr(e, "value", e) for e in events]
    assert values[0] is True and values[1] is False, values
    assert isinstance(values[2], PathInfo) and values[2].deriver is None, values


def new_world() -> tuple[World, FakeSession]:
    """A session with input, added, built and foreign paths; plus what ConnectionHandler
    reads of a real Session."""
    world = World(max_added_bytes=1 << 20)
    world.session.keeper = None  # type: ignore[attr-defined]
    world.session.service = SERVICE  # type: ignore[attr-defined]
    return world, world.session


async def fuzz(cases: int, seed: int, timeout: float, check_every: int, quiet: bool) -> dict:
    r = random.Random(seed)
    stats = {"cases": 0, "ok": 0, "hang": 0, "crash": 0, "good_client_checks": 0}
    world, session = await asyncio.to_thread(new_world)
    corpus = Corpus(world, r)
    started = time.monotonic()
    for i in range(cases):
        if i and i % 2000 == 0:  # a fresh store now and then bounds memory
            world, session = await asyncio.to_thread(new_world)
            corpus = Corpus(world, r)
        data = corpus.case()
        seen = len(session.events)
        try:
            result = await serve_case(session, data, r, timeout)
        except Crash as e:
            print(f"CRASH in case {i} (seed {seed}): input {data.hex()}\n{e}", file=sys.stderr)
            result = "crash"
        if result == "hang":
            print(f"HANG in case {i} (seed {seed}): input {data.hex()}", file=sys.stderr)
        stats[result] = stats.get(result, 0) + 1
        stats["cases"] += 1
        for ev in session.events[seen:]:  # how deep the cases reach
            key = "ev-" + ev["event"]
            stats[key] = stats.get(key, 0) + 1
        del session.events[seen:]
        if check_every and (i + 1) % check_every == 0:
            await good_client(session, world)
            stats["good_client_checks"] += 1
            if not quiet:
                rate = stats["cases"] / (time.monotonic() - started)
                print(f"{stats['cases']} cases, {rate:.0f}/s: {stats}", flush=True)
    await good_client(session, world)
    stats["good_client_checks"] += 1
    stats["seconds"] = round(time.monotonic() - started, 1)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--case-timeout", type=float, default=10.0)
    parser.add_argument("--check-every", type=int, default=10_000)
    parser.add_argument("--quiet", action="store_true")
    opts = parser.parse_args()
    import logging

    logging.disable(logging.CRITICAL)  # refusals are logged at info: millions of lines
    stats = asyncio.run(
        fuzz(opts.cases, opts.seed, opts.case_timeout, opts.check_every, opts.quiet)
    )
    print(f"done: {stats}")
    return 0 if stats["crash"] == 0 and stats["hang"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
