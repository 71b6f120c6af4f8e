"""Shared helpers for the protocol tests: hypothesis strategies derived from the
declared codecs, NAR building, and in-memory connection plumbing. (No tests here.)"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st

from recnix.protocol import (
    ClientConnection,
    DerivedPath,
    Error,
    HandshakeDone,
    Next,
    Read,
    Realisation,
    Result,
    ServerConnection,
    StartActivity,
    StopActivity,
    Write,
)
from recnix.protocol import schema as S
from recnix.protocol import wire as W
from recnix.protocol.connection import NEED_DATA

MINORS = range(W.MIN_CLIENT_MINOR, W.MAX_MINOR + 1)
FEATURE_SETS = [
    frozenset(),
    frozenset({W.FEATURE_REALISATION_WITH_PATH}),
    frozenset({W.FEATURE_DELETE_REFERRERS}),
]

u64s = st.integers(0, 2**64 - 1)
i64s = st.integers(-(2**63), 2**63 - 1)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
names = st.text("abcdefgxyz0123456789+-._?=", min_size=1, max_size=10)
store_paths = names.map(lambda n: f"/nix/store/{'a' * 32}-{n}")
drv_paths = names.map(lambda n: f"/nix/store/{'b' * 32}-{n}.drv")
output_names = st.lists(names, min_size=1, max_size=3, unique=True)


def derived_paths(minor: int) -> st.SearchStrategy[DerivedPath]:
    """DerivedPaths that survive the round trip at ``minor`` (legacy can't say opaque .drv)."""
    opaque = (store_paths | drv_paths) if minor >= 30 else store_paths
    built = st.builds(DerivedPath, drv_paths, output_names | st.just(["*"]))
    return st.builds(DerivedPath, opaque) | built


def realisations() -> st.SearchStrategy[Realisation]:
    sig_key = st.text("abcdefg-", min_size=1, max_size=5)
    sig = st.builds(lambda k, v: f"{k}:{v}", sig_key, texts)
    return st.builds(
        lambda rid, path, sigs, deps, structured: Realisation(
            rid, path, sigs, deps, bool(sigs) and structured
        ),
        st.builds(lambda n: f"sha256:{'c' * 64}!{n}", names),
        store_paths,
        st.none() | st.lists(sig, max_size=2),
        st.none() | st.dictionaries(texts, store_paths, max_size=2),
        st.booleans(),
    )


def single_derived_paths() -> st.SearchStrategy[Any]:
    return st.recursive(store_paths, lambda inner: st.tuples(inner, names), max_leaves=3)


def for_codec(codec: W.Codec, ctx: W.Ctx) -> st.SearchStrategy[Any]:
    """A strategy of values that ``codec`` round-trips at ``ctx``."""
    if codec is W.U64:
        return u64s
    if codec is W.I64:
        return i64s
    if codec is W.BOOL:
        return st.booleans()
    if codec is W.BYTES:
        return st.binary(max_size=20)
    if codec is W.STR:
        return texts
    if codec is W.OPT_STR:
        return st.none() | texts.filter(bool)
    if codec is W.TRUST:
        return st.sampled_from([None, 1, 2])
    if isinstance(codec, W.ListCodec):
        return st.lists(for_codec(codec.element, ctx), max_size=3)
    if isinstance(codec, W.MapCodec):
        return st.dictionaries(for_codec(codec.key, ctx), for_codec(codec.value, ctx), max_size=3)
    if isinstance(codec, W.OptionalCodec):
        return st.none() | for_codec(codec.inner, ctx)
    if isinstance(codec, W.VersionedCodec):
        return for_codec(codec.pick(ctx), ctx)
    if isinstance(codec, W.FeatureCodec):
        inner = codec.with_feature if ctx.has(codec.feature) else codec.without
        return for_codec(inner, ctx)
    if isinstance(codec, W.FixedMinorCodec):
        return for_codec(codec.inner, codec._ctx(ctx))
    if isinstance(codec, S.DerivedPathCodec):
        return derived_paths(ctx.minor)
    if isinstance(codec, S.RealisationJsonCodec):
        return realisations()
    if isinstance(codec, S.GCTargetCodec):
        return st.none() | st.fixed_dictionaries(
            {"paths": st.lists(store_paths, max_size=2), "delete_referrers": st.booleans()}
        )
    if isinstance(codec, S.SingleDerivedPathCodec):
        return single_derived_paths()
    if isinstance(codec, W.StructCodec):
        return struct_values(codec, ctx)
    raise AssertionError(f"no strategy for {codec!r}")


def struct_values(codec: W.StructCodec, ctx: W.Ctx) -> st.SearchStrategy[Any]:
    """Values of a struct: active fields generated, inactive ones at their defaults."""
    active = {f.name: for_codec(f.codec, ctx) for f in codec.fields if f.active(ctx)}
    if codec.factory is dict:
        defaults = {n: st.just(codec._defaults[n]) for n in codec.names if n not in active}
        return st.fixed_dictionaries({**defaults, **active})
    return st.builds(codec.factory, **active)


def stderr_messages(minor: int) -> st.SearchStrategy[Any]:
    """Log messages that round-trip at ``minor``."""
    fields = st.lists(u64s | texts, max_size=3)
    if minor >= 26:
        error = st.builds(Error, texts, st.just(1), u64s, texts, st.lists(texts, max_size=2))
    else:
        error = st.builds(Error, texts, u64s)
    common = [
        st.builds(Next, texts),
        st.builds(Read, u64s),
        st.builds(Write, st.binary(max_size=20)),
        error,
    ]
    if minor >= 20:
        common += [
            st.builds(StartActivity, u64s, u64s, u64s, texts, fields, u64s),
            st.builds(StopActivity, u64s),
            st.builds(Result, u64s, u64s, fields),
        ]
    return st.one_of(common)


def reencode_default(value: Any) -> Any:
    """Dataclass → dict recursively (for readable assertion messages)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# ---------------------------------------------------------------- NAR building


def tok(data: bytes) -> bytes:
    out = bytearray()
    W.write_bytes(out, data)
    return bytes(out)


def nar_file(contents: bytes, executable: bool = False) -> bytes:
    """A NAR of one regular file."""
    parts = [b"nix-archive-1", b"(", b"type", b"regular"]
    if executable:
        parts += [b"executable", b""]
    return b"".join(tok(p) for p in parts) + tok(b"contents") + tok(contents) + tok(b")")


def nar_dir(entries: dict[bytes, bytes]) -> bytes:
    """A NAR of a directory of regular files."""
    out = b"".join(tok(p) for p in [b"nix-archive-1", b"(", b"type", b"directory"])
    for name in sorted(entries):
        out += tok(b"entry") + tok(b"(") + tok(b"name") + tok(name) + tok(b"node")
        out += tok(b"(") + tok(b"type") + tok(b"regular") + tok(b"contents")
        out += tok(entries[name]) + tok(b")") + tok(b")")
    return out + tok(b")")


# ---------------------------------------------------------------- plumbing


def pump(a: Any, b: Any) -> None:
    """Move queued output of ``a`` into ``b`` (empty output is not an EOF)."""
    data = a.data_to_send()
    if data:
        b.receive_data(data)


def events_until_need(conn: Any, limit: int = 100000) -> list[Any]:
    """All events up to NEED_DATA (or ConnectionClosed)."""
    out = []
    for _ in range(limit):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if type(ev).__name__ == "ConnectionClosed":
            return out
    raise AssertionError("no NEED_DATA after many events (hang?)")


def connected_pair(
    client_minor: int,
    server_minor: int = W.SERVER_MINOR_DEFAULT,
    client_features: frozenset[str] = frozenset(),
    server_features: frozenset[str] = frozenset(),
    trust: int | None = 2,
) -> tuple[ClientConnection, ServerConnection, HandshakeDone, HandshakeDone]:
    """A client and a server connection after a handshake done purely in memory."""
    client = ClientConnection(client_minor, client_features)
    server = ServerConnection(server_minor, "2.8.0", trust, server_features)
    client.initiate()
    s_done = c_done = None
    for _ in range(10):
        pump(client, server)
        for ev in events_until_need(server):
            s_done = ev
        pump(server, client)
        for ev in events_until_need(client):
            c_done = ev
        if s_done and c_done:
            break
    assert isinstance(s_done, HandshakeDone) and isinstance(c_done, HandshakeDone)
    return client, server, c_done, s_done
