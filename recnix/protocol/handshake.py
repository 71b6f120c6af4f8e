"""Sans-IO handshake state machines for both roles (NI §1.2).

Each is a decoder generator (see :class:`~recnix.protocol.wire.Decoder`) that
queues its own output through ``send`` and returns a :class:`HandshakeDone`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ProtocolError
from .schema import CLIENT_HANDSHAKE_INFO
from .types import ClientHandshakeInfo
from .wire import (
    MAX_MINOR,
    MIN_CLIENT_MINOR,
    STRS,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    Ctx,
    Gen,
    Stderr,
    encode,
    make_version,
    read_u64,
    u64,
)

Send = Callable[[bytes], None]


@dataclass
class HandshakeDone:
    """The handshake is complete; ``minor`` = min(client, server) governs every layout."""

    client_minor: int
    server_minor: int
    minor: int
    features: frozenset[str]
    nix_version: str | None = None
    trust: int | None = None


def _check_version(version: int, who: str) -> int:
    if version >= 1 << 32 or (version & 0xFF00) != 0x100:
        raise ProtocolError(f"unsupported {who} protocol version {version:#x}")
    return version & 0xFF


def server_handshake(
    send: Send,
    server_minor: int,
    nix_version: str,
    trust: int | None,
    features: frozenset[str],
    limits: Ctx,
) -> Gen:
    """Server role: read magic, version, features, obsolete fields; send ours, then STDERR_LAST."""
    if not MIN_CLIENT_MINOR <= server_minor <= MAX_MINOR:
        raise ValueError(f"server minor {server_minor} not supported")
    if (yield from read_u64()) != WORKER_MAGIC_1:
        raise ProtocolError("protocol mismatch (bad client magic)")
    send(u64(WORKER_MAGIC_2) + u64(make_version(server_minor)))
    client_minor = _check_version((yield from read_u64()), "client")
    if client_minor < MIN_CLIENT_MINOR:
        raise ProtocolError(f"the Nix client version 1.{client_minor} is too old")
    minor = min(client_minor, server_minor)
    ctx = Ctx(minor, frozenset(), limits.max_string, limits.max_list)
    negotiated: frozenset[str] = frozenset()
    if minor >= 38:
        theirs = yield from STRS.read(ctx)
        send(encode(STRS, set(features), ctx))
        negotiated = frozenset(theirs) & features
    if minor >= 14 and (yield from read_u64()):
        yield from read_u64()  # obsolete CPU affinity
    if minor >= 11:
        yield from read_u64()  # obsolete reserveSpace
    ctx = Ctx(minor, negotiated, limits.max_string, limits.max_list)
    info = ClientHandshakeInfo(nix_version, trust)
    send(encode(CLIENT_HANDSHAKE_INFO, info, ctx) + u64(Stderr.LAST))
    return HandshakeDone(
        client_minor,
        server_minor,
        minor,
        negotiated,
        nix_version if minor >= 33 else None,
        trust if minor >= 35 else None,
    )


def client_hello(client_minor: int) -> bytes:
    """What a client sends first: magic and its version, pipelined (as Nix >= 2.24 does)."""
    return u64(WORKER_MAGIC_1) + u64(make_version(client_minor))


def client_handshake(send: Send, client_minor: int, features: frozenset[str], limits: Ctx) -> Gen:
    """Client role, after :func:`client_hello` was sent; returns before the server's STDERR_LAST."""
    if not MIN_CLIENT_MINOR <= client_minor <= MAX_MINOR:
        raise ValueError(f"client minor {client_minor} not supported")
    if (yield from read_u64()) != WORKER_MAGIC_2:
        raise ProtocolError("protocol mismatch (bad daemon magic)")
    server_minor = _check_version((yield from read_u64()), "daemon")
    if server_minor < MIN_CLIENT_MINOR:
        raise ProtocolError(f"the Nix daemon version 1.{server_minor} is too old")
    minor = min(client_minor, server_minor)
    ctx = Ctx(minor, frozenset(), limits.max_string, limits.max_list)
    negotiated: frozenset[str] = frozenset()
    if minor >= 38:
        send(encode(STRS, set(features), ctx))
        theirs = yield from STRS.read(ctx)
        negotiated = frozenset(theirs) & features
    rest = b""
    if minor >= 14:
        rest += u64(0)  # no CPU affinity
    if minor >= 11:
        rest += u64(0)  # reserveSpace
    if rest:
        send(rest)
    info = yield from CLIENT_HANDSHAKE_INFO.read(ctx)
    return HandshakeDone(
        client_minor, server_minor, minor, negotiated, info.nix_version, info.trust
    )
