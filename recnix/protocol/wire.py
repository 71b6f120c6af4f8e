"""Wire constants, the receive buffer, and primitive codecs of the worker protocol.

Decoding is incremental without re-parsing: a decoder is a generator that
yields the exact number of bytes it needs next and is sent exactly those bytes
back (see :class:`Decoder`). Encoders append to a ``bytearray``.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .errors import ProtocolError

WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
SERVER_MINOR_DEFAULT = 35
MIN_CLIENT_MINOR = 10
MAX_MINOR = 38
STORE_DIR = "/nix/store"

MAX_STRING_LEN = 64 * 1024 * 1024
MAX_LIST_LEN = 1 << 22
MAX_FRAME_LEN = (1 << 32) - 1

FEATURE_REALISATION_WITH_PATH = "realisation-with-path-not-hash"
FEATURE_DELETE_REFERRERS = "delete-dead-specific-referrers"


class Op(IntEnum):
    """Worker operation numbers (NI §2.1)."""

    IS_VALID_PATH = 1
    HAS_SUBSTITUTES = 3
    QUERY_PATH_HASH = 4
    QUERY_REFERENCES = 5
    QUERY_REFERRERS = 6
    ADD_TO_STORE = 7
    ADD_TEXT_TO_STORE = 8
    BUILD_PATHS = 9
    ENSURE_PATH = 10
    ADD_TEMP_ROOT = 11
    ADD_INDIRECT_ROOT = 12
    SYNC_WITH_GC = 13
    FIND_ROOTS = 14
    EXPORT_PATH = 16
    QUERY_DERIVER = 18
    SET_OPTIONS = 19
    COLLECT_GARBAGE = 20
    QUERY_SUBSTITUTABLE_PATH_INFO = 21
    QUERY_DERIVATION_OUTPUTS = 22
    QUERY_ALL_VALID_PATHS = 23
    QUERY_PATH_INFO = 26
    IMPORT_PATHS = 27
    QUERY_DERIVATION_OUTPUT_NAMES = 28
    QUERY_PATH_FROM_HASH_PART = 29
    QUERY_SUBSTITUTABLE_PATH_INFOS = 30
    QUERY_VALID_PATHS = 31
    QUERY_SUBSTITUTABLE_PATHS = 32
    QUERY_VALID_DERIVERS = 33
    OPTIMISE_STORE = 34
    VERIFY_STORE = 35
    BUILD_DERIVATION = 36
    ADD_SIGNATURES = 37
    NAR_FROM_PATH = 38
    ADD_TO_STORE_NAR = 39
    QUERY_MISSING = 40
    QUERY_DERIVATION_OUTPUT_MAP = 41
    REGISTER_DRV_OUTPUT = 42
    QUERY_REALISATION = 43
    ADD_MULTIPLE_TO_STORE = 44
    ADD_BUILD_LOG = 45
    BUILD_PATHS_WITH_RESULTS = 46
    ADD_PERM_ROOT = 47
    SUBMIT_OUTPUT = 1000
    ADD_TO_STORE_SCANNING = 1001


class Stderr(IntEnum):
    """Tags of the server→client log stream (NI §1.4)."""

    NEXT = 0x6F6C6D67
    READ = 0x64617461
    WRITE = 0x64617416
    LAST = 0x616C7473
    ERROR = 0x63787470
    START_ACTIVITY = 0x53545254
    STOP_ACTIVITY = 0x53544F50
    RESULT = 0x52534C54


def make_version(minor: int) -> int:
    """Protocol version number for 1.<minor>."""
    return 0x100 | minor


@dataclass(frozen=True, slots=True)
class Ctx:
    """Negotiated parameters every codec is given: minor, features and input limits."""

    minor: int
    features: frozenset[str] = frozenset()
    max_string: int = MAX_STRING_LEN
    max_list: int = MAX_LIST_LEN

    def has(self, feature: str) -> bool:
        """Whether ``feature`` was negotiated."""
        return feature in self.features


# --------------------------------------------------------------------------- buffer


class ReceiveBuffer:
    """Bytes received and not yet consumed; consuming is O(bytes consumed).

    The consumed prefix is dropped only once it is at least half of the
    storage, so every byte is moved at most a constant number of times.
    """

    __slots__ = ("_buf", "_start", "offset", "eof")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0
        self.offset = 0  # absolute stream offset of the first unconsumed byte
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._start and self._start * 2 >= len(self._buf):
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf) - self._start

    def take(self, n: int) -> bytes:
        """Consume exactly ``n`` bytes (caller checked ``len(self) >= n``)."""
        start = self._start
        data = bytes(memoryview(self._buf)[start : start + n])
        self._start = start + n
        self.offset += n
        return data

    def raw(self) -> tuple[bytearray, int]:
        """The storage and the index of the first unconsumed byte in it (for a decoder
        that reads in place, then ``skip``s what it used; valid until next feed/take)."""
        return self._buf, self._start

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes without copying them (caller checked ``len(self) >= n``)."""
        self._start += n
        self.offset += n

    def peek(self, n: int) -> memoryview:
        """Up to ``n`` unconsumed bytes, without consuming them (valid until next feed/take)."""
        return memoryview(self._buf)[self._start : self._start + n]


Gen = Generator[int, bytes, Any]


class Decoder:
    """Drives one decoder generator over a :class:`ReceiveBuffer`.

    ``step(buf)`` returns True once the value is complete (in ``value``) and
    False when it needs more bytes. Any non-protocol exception raised while
    decoding is turned into :class:`ProtocolError` with the offset of the item.
    """

    __slots__ = ("_gen", "_want", "value", "done", "what")

    def __init__(self, gen: Gen, what: str = "message") -> None:
        self._gen = gen
        self.what = what
        self.done = False
        self.value: Any = None
        self._want = 0
        self._advance(None, 0)

    def _advance(self, chunk: bytes | None, offset: int) -> None:
        try:
            self._want = next(self._gen) if chunk is None else self._gen.send(chunk)
        except StopIteration as stop:
            self.done = True
            self.value = stop.value
        except ProtocolError as e:
            if e.offset is None:
                e.offset = offset
            raise
        except (ValueError, struct.error, UnicodeError, KeyError, TypeError, OverflowError) as e:
            raise ProtocolError(f"bad {self.what}: {e}", offset) from None

    def step(self, buf: ReceiveBuffer) -> bool:
        """Feed buffered bytes to the generator; True when the value is complete."""
        while not self.done:
            want = self._want
            if len(buf) < want:
                if buf.eof:
                    raise ProtocolError(f"unexpected end of stream in {self.what}", buf.offset)
                return False
            offset = buf.offset
            self._advance(buf.take(want), offset)
        return True


def decode_all(codec: Codec, data: bytes, ctx: Ctx) -> tuple[Any, int]:
    """Decode one value of ``codec`` from the start of ``data``; returns (value, bytes used)."""
    buf = ReceiveBuffer()
    buf.feed(data)
    buf.eof = True
    dec = Decoder(codec.read(ctx), type(codec).__name__)
    dec.step(buf)
    return dec.value, buf.offset


def encode(codec: Codec, value: Any, ctx: Ctx) -> bytes:
    """Encode one value with ``codec``."""
    out = bytearray()
    codec.write(out, value, ctx)
    return bytes(out)


# --------------------------------------------------------------------------- primitives

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
ZEROS = bytes(8)


def u64(value: int) -> bytes:
    """Encode one u64."""
    return _U64.pack(value)


def read_u64() -> Gen:
    """Decode one u64."""
    data = yield 8
    return _U64.unpack(data)[0]


def read_bool() -> Gen:
    """Decode a strict boolean (exactly 0 or 1)."""
    data = yield 8
    value = _U64.unpack(data)[0]
    if value > 1:
        raise ProtocolError(f"boolean must be 0 or 1, got {value}")
    return value == 1


def read_bytes(max_len: int) -> Gen:
    """Decode a length-prefixed, zero-padded byte string."""
    data = yield 8
    n = _U64.unpack(data)[0]
    if n > max_len:
        raise ProtocolError(f"string of {n} bytes exceeds the limit of {max_len}")
    pad = (-n) % 8
    if n + pad == 0:
        return b""
    data = yield n + pad
    if pad and data[n:] != ZEROS[:pad]:
        raise ProtocolError("non-zero string padding")
    return data[:n] if pad else data


def write_bytes(out: bytearray, data: bytes) -> None:
    """Encode a length-prefixed, zero-padded byte string."""
    n = len(data)
    out += _U64.pack(n)
    out += data
    if n % 8:
        out += ZEROS[: 8 - n % 8]


def read_count(ctx: Ctx, what: str) -> Gen:
    """Decode a collection length, bounded by ``ctx.max_list``."""
    data = yield 8
    n = _U64.unpack(data)[0]
    if n > ctx.max_list:
        raise ProtocolError(f"{what} of {n} entries exceeds the limit of {ctx.max_list}")
    return n


def decode_str(data: bytes) -> str:
    """Bytes from the wire as ``str`` (UTF-8, undecodable bytes kept via surrogateescape)."""
    return data.decode("utf-8", "surrogateescape")


def encode_str(text: str) -> bytes:
    """Inverse of :func:`decode_str`."""
    return text.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- codecs


class Codec:
    """A wire type: ``read(ctx)`` is a decoder generator, ``write`` appends the encoding."""

    def read(self, ctx: Ctx) -> Gen:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, out: bytearray, value: Any, ctx: Ctx) -> None:  # pragma: no cover
        raise NotImplementedError


class U64Codec(Codec):
    """Unsigned 64-bit integer."""

    def read(self, ctx: Ctx) -> Gen:
        data = yield 8
        return _U64.unpack(data)[0]

    def write(self, out: bytearray, value: int, ctx: Ctx) -> None:
        out += _U64.pack(value)


class I64Codec(Codec):
    """Signed 64-bit integer (microsecond durations)."""

    def read(self, ctx: Ctx) -> Gen:
        data = yield 8
        return _I64.unpack(data)[0]

    def write(self, out: bytearray, value: int, ctx: Ctx) -> None:
        out += _I64.pack(value)


class BoolCodec(Codec):
    """Boolean sent as u64; strictly 0 or 1 on input."""

    def read(self, ctx: Ctx) -> Gen:
        return (yield from read_bool())

    def write(self, out: bytearray, value: bool, ctx: Ctx) -> None:
        out += _U64.pack(1 if value else 0)


class BytesCodec(Codec):
    """Padded byte string kept as ``bytes``."""

    def read(self, ctx: Ctx) -> Gen:
        return (yield from read_bytes(ctx.max_string))

    def write(self, out: bytearray, value: bytes, ctx: Ctx) -> None:
        write_bytes(out, value)


class StrCodec(Codec):
    """Padded string as ``str`` (UTF-8 with surrogateescape)."""

    def read(self, ctx: Ctx) -> Gen:
        return decode_str((yield from read_bytes(ctx.max_string)))

    def write(self, out: bytearray, value: str, ctx: Ctx) -> None:
        write_bytes(out, encode_str(value))


class OptStrCodec(Codec):
    """String where "" means absent (``None``): optional store paths and content addresses."""

    def read(self, ctx: Ctx) -> Gen:
        data = yield from read_bytes(ctx.max_string)
        return decode_str(data) if data else None

    def write(self, out: bytearray, value: str | None, ctx: Ctx) -> None:
        write_bytes(out, encode_str(value) if value else b"")


class ListCodec(Codec):
    """``u64 n`` then n elements; decoded to ``list``. A ``set`` value is written sorted."""

    def __init__(self, element: Codec) -> None:
        self.element = element

    def read(self, ctx: Ctx) -> Gen:
        n = yield from read_count(ctx, "list")
        element = self.element
        items = []
        for _ in range(n):
            items.append((yield from element.read(ctx)))
        return items

    def write(self, out: bytearray, value: Iterable[Any], ctx: Ctx) -> None:
        items = sorted(value) if isinstance(value, set | frozenset) else list(value)
        out += _U64.pack(len(items))
        for item in items:
            self.element.write(out, item, ctx)


class MapCodec(Codec):
    """``u64 n`` then n (key, value) pairs; decoded to ``dict`` (wire order kept)."""

    def __init__(self, key: Codec, value: Codec) -> None:
        self.key = key
        self.value = value

    def read(self, ctx: Ctx) -> Gen:
        n = yield from read_count(ctx, "map")
        result: dict[Any, Any] = {}
        for _ in range(n):
            k = yield from self.key.read(ctx)
            result[k] = yield from self.value.read(ctx)
        return result

    def write(self, out: bytearray, value: dict[Any, Any], ctx: Ctx) -> None:
        out += _U64.pack(len(value))
        for k, v in value.items():
            self.key.write(out, k, ctx)
            self.value.write(out, v, ctx)


class OptionalCodec(Codec):
    """``u64 0`` (``None``) or ``u64 1`` followed by the value."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner

    def read(self, ctx: Ctx) -> Gen:
        present = yield from read_bool()
        return (yield from self.inner.read(ctx)) if present else None

    def write(self, out: bytearray, value: Any, ctx: Ctx) -> None:
        if value is None:
            out += ZEROS
        else:
            out += _U64.pack(1)
            self.inner.write(out, value, ctx)


class TrustCodec(Codec):
    """Optional trusted flag: 0 unknown (``None``), 1 trusted, 2 not trusted."""

    def read(self, ctx: Ctx) -> Gen:
        data = yield 8
        value = _U64.unpack(data)[0]
        if value > 2:
            raise ProtocolError(f"trust flag must be 0, 1 or 2, got {value}")
        return value or None

    def write(self, out: bytearray, value: int | None, ctx: Ctx) -> None:
        out += _U64.pack(value or 0)


class VersionedCodec(Codec):
    """Picks a codec by minor: ``[(since_minor, codec), ...]``, the newest matching wins."""

    def __init__(self, *choices: tuple[int, Codec]) -> None:
        self.choices = sorted(choices, key=lambda c: -c[0])

    def pick(self, ctx: Ctx) -> Codec:
        """The codec in effect at ``ctx.minor``."""
        for since, codec in self.choices:
            if ctx.minor >= since:
                return codec
        raise ProtocolError(f"no encoding at protocol minor {ctx.minor}")

    def read(self, ctx: Ctx) -> Gen:
        return (yield from self.pick(ctx).read(ctx))

    def write(self, out: bytearray, value: Any, ctx: Ctx) -> None:
        self.pick(ctx).write(out, value, ctx)


class FeatureCodec(Codec):
    """One codec when ``feature`` was negotiated, another otherwise."""

    def __init__(self, feature: str, with_feature: Codec, without: Codec) -> None:
        self.feature = feature
        self.with_feature = with_feature
        self.without = without

    def read(self, ctx: Ctx) -> Gen:
        codec = self.with_feature if ctx.has(self.feature) else self.without
        return (yield from codec.read(ctx))

    def write(self, out: bytearray, value: Any, ctx: Ctx) -> None:
        codec = self.with_feature if ctx.has(self.feature) else self.without
        codec.write(out, value, ctx)


class FixedMinorCodec(Codec):
    """Encodes its inner codec at a fixed minor (e.g. PathInfo "format 16")."""

    def __init__(self, minor: int, inner: Codec) -> None:
        self.minor = minor
        self.inner = inner

    def _ctx(self, ctx: Ctx) -> Ctx:
        return Ctx(self.minor, ctx.features, ctx.max_string, ctx.max_list)

    def read(self, ctx: Ctx) -> Gen:
        return (yield from self.inner.read(self._ctx(ctx)))

    def write(self, out: bytearray, value: Any, ctx: Ctx) -> None:
        self.inner.write(out, value, self._ctx(ctx))


# --------------------------------------------------------------------------- declared fields


@dataclass(frozen=True)
class Field:
    """A message field, on the wire when ``since <= minor < until`` and its feature gates hold."""

    name: str
    codec: Codec
    since: int = 0
    until: int | None = None
    feature: str | None = None  # present only if this feature was negotiated
    unless: str | None = None  # present only if this feature was NOT negotiated
    default: Any = None

    def active(self, ctx: Ctx) -> bool:
        """Whether the field is on the wire for ``ctx``."""
        if ctx.minor < self.since or (self.until is not None and ctx.minor >= self.until):
            return False
        if self.feature is not None and self.feature not in ctx.features:
            return False
        return not (self.unless is not None and self.unless in ctx.features)


class StructCodec(Codec):
    """Fields in order, each gated on minor/features; decoded to a dict or a dataclass.

    A name may appear in several fields with disjoint gates (its type changed at
    some minor). Absent fields take their declared default.
    """

    def __init__(self, fields: list[Field], factory: Callable[..., Any] = dict) -> None:
        self.fields = fields
        self.factory = factory
        self.names = list(dict.fromkeys(f.name for f in fields))
        self._defaults = {f.name: f.default for f in reversed(fields)}

    def read(self, ctx: Ctx) -> Gen:
        values: dict[str, Any] = {}
        for f in self.fields:
            if f.active(ctx):
                values[f.name] = yield from f.codec.read(ctx)
        if self.factory is dict:
            for name in self.names:
                if name not in values:
                    values[name] = copy.copy(self._defaults[name])
        return self.factory(**values)

    def write(self, out: bytearray, value: Any, ctx: Ctx) -> None:
        is_dict = isinstance(value, dict)
        for f in self.fields:
            if f.active(ctx):
                item = value.get(f.name, f.default) if is_dict else getattr(value, f.name)
                f.codec.write(out, item, ctx)


U64 = U64Codec()
I64 = I64Codec()
BOOL = BoolCodec()
BYTES = BytesCodec()
STR = StrCodec()
OPT_STR = OptStrCodec()
PATH = STR  # store path: full printed path, as str
OPT_PATH = OPT_STR
PATHS = ListCodec(PATH)
STRS = ListCodec(STR)
TRUST = TrustCodec()
