"""Sans-IO connections: :class:`ServerConnection` (we serve a Nix client) and
:class:`ClientConnection` (we talk to a nix-daemon).

Feed received bytes with ``receive_data`` (``b""`` = EOF), pull events with
``next_event`` until ``NEED_DATA``, and drain output with ``data_to_send``.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from recnix.protocol.nar import NarParser

from .errors import ProtocolError
from .handshake import HandshakeDone, client_handshake, client_hello, server_handshake
from .schema import OPS, OpSpec, StreamKind, op_spec
from .stderr import Error, Last, Read, StderrMessage, read_stderr, write_stderr
from .wire import (
    MAX_FRAME_LEN,
    MAX_LIST_LEN,
    MAX_STRING_LEN,
    PATH,
    SERVER_MINOR_DEFAULT,
    Ctx,
    Decoder,
    Op,
    ReceiveBuffer,
    Stderr,
    read_bytes,
    u64,
    write_bytes,
)

TUNNEL_CHUNK = 65536  # bytes asked for per STDERR_READ

_OP_AND_LEN = struct.Struct("<QQ")


def _single_path_ops() -> dict[int, OpSpec]:
    """Ops whose request is one store path and nothing else, at every minor, with no
    trailing stream (IsValidPath, QueryPathInfo, ...): ServerConnection decodes them
    in one go."""
    ops = {}
    for op, spec in OPS.items():
        fields = spec.request.fields
        if (
            len(fields) == 1
            and fields[0].name == "path"
            and fields[0].codec is PATH
            and fields[0].since == 0
            and fields[0].until is None
            and fields[0].feature is None
            and fields[0].unless is None
            and spec.streams == ((0, StreamKind.NONE),)
        ):
            ops[op] = spec
    return ops


SINGLE_PATH_OPS = _single_path_ops()


def feed_nar(nar: NarParser, data: bytes | memoryview, offset: int) -> int:
    """``nar.feed(data)``, with any non-protocol exception turned into ``ProtocolError``."""
    try:
        return nar.feed(data)
    except ProtocolError:
        raise
    except (ValueError, TypeError, UnicodeError, OverflowError, IndexError) as e:
        raise ProtocolError(f"bad NAR: {e}", offset) from None


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""``next_event`` result: more input is needed."""


@dataclass
class Request:
    """A complete request (server role). Stream events may follow (see ``StreamKind``)."""

    op: Op
    args: dict[str, Any]


@dataclass
class Data:
    """A piece of a trailing stream: framed payload (unframed) or plain NAR bytes."""

    data: bytes


@dataclass
class EndOfData:
    """The trailing stream is complete."""


@dataclass
class ConnectionClosed:
    """The peer closed the connection at a message boundary."""


@dataclass
class Log:
    """A log message from the daemon (anything but STDERR_LAST / STDERR_ERROR)."""

    msg: StderrMessage


@dataclass
class ErrorReply:
    """The daemon ended the current op (or the handshake) with STDERR_ERROR."""

    error: Error


@dataclass
class Reply:
    """The daemon's reply to an op (``None`` for ops without a reply payload)."""

    op: Op
    value: Any


Event = (
    _NeedData
    | HandshakeDone
    | Request
    | Data
    | EndOfData
    | ConnectionClosed
    | Log
    | ErrorReply
    | Reply
)


class Phase(enum.Enum):
    """Where a connection is in its stream; ``next_event`` reads by phase."""

    NEW = "new"  # client: initiate() not called yet
    HANDSHAKE = "handshake"  # the magic/version exchange
    IDLE = "idle"  # server: between requests; client: no request in flight
    REQUEST = "request"  # server: an op's arguments are being read
    FRAMED = "framed"  # server: the request's framed data stream (minor >= 23)
    NAR = "nar"  # a NAR as the request's (server) or reply's (client) data
    TUNNEL = "tunnel"  # server: data pulled from the client with STDERR_READ
    STDERR = "stderr"  # client: log messages until the reply
    REPLY = "reply"  # client: the op's reply
    CLOSED = "closed"  # the peer closed the connection


class _Base:
    """Buffers, stream readers and output queue shared by both roles."""

    def __init__(self, max_string: int, max_list: int) -> None:
        self._buf = ReceiveBuffer()
        self._out = bytearray()
        self._limits = Ctx(0, frozenset(), max_string, max_list)
        self.ctx: Ctx | None = None
        self._dec: Decoder | None = None
        self._state: Phase = Phase.HANDSHAKE
        self._frame_left = 0
        self._nar: NarParser | None = None

    # -- I/O side

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` signals EOF."""
        if not data:
            self._buf.eof = True
        elif self._buf.eof:
            raise ProtocolError("data received after EOF", self._buf.offset)
        else:
            self._buf.feed(data)

    @property
    def buffered(self) -> int:
        """Received bytes not consumed yet (for read backpressure)."""
        return len(self._buf)

    def data_to_send(self) -> bytes:
        """Drain queued output."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def _send(self, data: bytes) -> None:
        self._out += data

    @property
    def minor(self) -> int:
        """The negotiated minor (after the handshake)."""
        if self.ctx is None:
            raise RuntimeError("handshake not complete")
        return self.ctx.minor

    # -- stream readers; each returns an event or None to keep going

    def _need(self, what: str) -> _NeedData:
        if self._buf.eof:
            raise ProtocolError(f"unexpected end of stream in {what}", self._buf.offset)
        return NEED_DATA

    def _read_framed(self) -> Event:
        buf = self._buf
        if self._frame_left == 0:
            if len(buf) < 8:
                return self._need("framed data")
            offset = buf.offset
            n = int.from_bytes(buf.take(8), "little")
            if n == 0:
                self._state = Phase.IDLE
                return EndOfData()
            if n > MAX_FRAME_LEN:
                raise ProtocolError(f"frame of {n} bytes is too large", offset)
            self._frame_left = n
        if not len(buf):
            return self._need("framed data")
        data = buf.take(min(len(buf), self._frame_left))
        self._frame_left -= len(data)
        return Data(data)

    def _start_nar(self) -> None:
        self._nar = NarParser()
        self._state = Phase.NAR

    def _read_nar(self) -> Event:
        nar = self._nar
        assert nar is not None
        buf = self._buf
        while True:
            if nar.done:
                self._state = Phase.IDLE
                self._nar = None
                return EndOfData()
            if not len(buf):
                return self._need("NAR")
            with buf.peek(len(buf)) as view:
                n = feed_nar(nar, view, buf.offset)
            if n:
                return Data(buf.take(n))


class ServerConnection(_Base):
    """We serve a Nix client: handshake, then requests (and their streams) as events."""

    def __init__(
        self,
        server_minor: int = SERVER_MINOR_DEFAULT,
        nix_version: str = "2.8.0",
        trust: int | None = None,
        features: frozenset[str] = frozenset(),
        *,
        max_string: int = MAX_STRING_LEN,
        max_list: int = MAX_LIST_LEN,
    ) -> None:
        super().__init__(max_string, max_list)
        self.server_minor = server_minor
        self._spec: OpSpec | None = None
        self._tunnel_asked = False
        gen = server_handshake(
            self._send, server_minor, nix_version, trust, frozenset(features), self._limits
        )
        self._dec = Decoder(gen, "handshake")

    def next_event(self) -> Event:
        """The next event, or ``NEED_DATA``. Raises ``ProtocolError`` on bad input."""
        buf = self._buf
        while True:
            state = self._state
            if state is Phase.IDLE:
                if not len(buf):
                    if buf.eof:
                        self._state = Phase.CLOSED
                        return ConnectionClosed()
                    return NEED_DATA
                if len(buf) >= 16:
                    request = self._single_path_request()
                    if request is not None:
                        return request
                elif len(buf) < 8:
                    return self._need("operation number")
                offset = buf.offset
                op = int.from_bytes(buf.take(8), "little")
                try:
                    spec = op_spec(op)
                except ProtocolError as e:
                    e.offset = offset
                    raise
                self._spec = spec
                assert self.ctx is not None
                self._dec = Decoder(spec.request.read(self.ctx), f"{spec.op.name} request")
                self._state = Phase.REQUEST
            elif state is Phase.REQUEST:
                assert self._dec is not None and self._spec is not None and self.ctx is not None
                if not self._dec.step(buf):
                    return NEED_DATA
                spec = self._spec
                kind = spec.stream(self.ctx.minor)
                if kind is StreamKind.FRAMED:
                    self._state = Phase.FRAMED
                    self._frame_left = 0
                elif kind is StreamKind.NAR:
                    self._start_nar()
                elif kind is StreamKind.TUNNEL_NAR:
                    self._start_nar()
                    self._state = Phase.TUNNEL
                    self._tunnel_asked = False
                else:
                    # NONE, or TUNNEL (ImportPaths): data flows only if we send STDERR_READ
                    self._state = Phase.IDLE
                return Request(spec.op, self._dec.value)
            elif state is Phase.FRAMED:
                return self._read_framed()
            elif state is Phase.NAR:
                return self._read_nar()
            elif state is Phase.TUNNEL:
                event = self._read_tunnel()
                if event is not None:
                    return event
            elif state is Phase.HANDSHAKE:
                assert self._dec is not None
                if not len(buf) and buf.eof and buf.offset == 0:
                    self._state = Phase.CLOSED
                    return ConnectionClosed()
                if not self._dec.step(buf):
                    return NEED_DATA
                done: HandshakeDone = self._dec.value
                self.ctx = Ctx(
                    done.minor,
                    done.features,
                    self._limits.max_string,
                    self._limits.max_list,
                )
                self._state = Phase.IDLE
                return done
            else:
                return ConnectionClosed()

    def _single_path_request(self) -> Request | None:
        """A complete, well-formed request of one of SINGLE_PATH_OPS at the start of the
        buffer, decoded in one go (the hottest requests); None: the general decoder
        takes it (and reports anything malformed in it)."""
        buf = self._buf
        raw, start = buf.raw()
        decoded = self._decode_single_path(raw, start)
        if decoded is None:
            return None
        request, end = decoded
        buf.skip(end - start)
        return request

    def receive_single_path_request(self, data: bytes) -> Request | None:
        """``receive_data(data)`` then ``next_event()``, in one go, when the connection is
        between requests with nothing buffered and ``data`` is exactly one complete,
        well-formed request of SINGLE_PATH_OPS; else None and nothing is consumed
        (call ``receive_data``)."""
        buf = self._buf
        if self._state is not Phase.IDLE or len(buf) or buf.eof or len(data) < 16:
            return None
        decoded = self._decode_single_path(data, 0)
        if decoded is None or decoded[1] != len(data):
            return None
        buf.offset += len(data)
        return decoded[0]

    def _decode_single_path(self, raw: bytes | bytearray, start: int) -> tuple[Request, int] | None:
        """The SINGLE_PATH_OPS request at ``raw[start:]`` and where it ends, or None."""
        op, n = _OP_AND_LEN.unpack_from(raw, start)
        spec = SINGLE_PATH_OPS.get(op)
        if spec is None or n > self._limits.max_string:
            return None
        begin = start + 16
        end = begin + ((n + 7) & ~7)
        if len(raw) < end or raw.count(0, begin + n, end) != end - begin - n:
            return None  # incomplete, or non-zero padding
        path = raw[begin : begin + n].decode("utf-8", "surrogateescape")
        self._spec = spec
        return Request(spec.op, {"path": path}), end

    def _read_tunnel(self) -> Event | None:
        """AddToStoreNar at minors 21-22: pull the NAR with STDERR_READ."""
        nar = self._nar
        assert nar is not None and self.ctx is not None
        if nar.done:
            self._state = Phase.IDLE
            self._nar = None
            return EndOfData()
        if not self._tunnel_asked:
            write_stderr(self._out, Read(TUNNEL_CHUNK), self.ctx)
            self._tunnel_asked = True
            self._dec = Decoder(read_bytes(TUNNEL_CHUNK), "STDERR_READ reply")
        assert self._dec is not None
        if not self._dec.step(self._buf):
            return NEED_DATA
        self._tunnel_asked = False
        chunk: bytes = self._dec.value
        if not chunk:
            raise ProtocolError("client sent no data for STDERR_READ", self._buf.offset)
        if feed_nar(nar, chunk, self._buf.offset) != len(chunk):
            raise ProtocolError("data after the end of the NAR", self._buf.offset)
        return Data(chunk)

    # -- sending

    def send_log(self, msg: StderrMessage) -> None:
        """Queue a log message (encoded for the client's minor; may be dropped below 1.20)."""
        assert self.ctx is not None, "handshake not complete"
        write_stderr(self._out, msg, self.ctx)

    def send_reply(self, op: Op | int, value: Any = None) -> None:
        """Queue STDERR_LAST and the encoded reply of ``op``."""
        self._write_reply(self._out, op, value)

    def encode_reply(self, op: Op | int, value: Any = None) -> bytes:
        """The bytes ``send_reply(op, value)`` would queue, for a caller that caches them
        (then ``send_raw``); valid for this connection's negotiated version only."""
        out = bytearray()
        self._write_reply(out, op, value)
        return bytes(out)

    def _write_reply(self, out: bytearray, op: Op | int, value: Any) -> None:
        assert self.ctx is not None, "handshake not complete"
        spec = op_spec(op)
        out += u64(Stderr.LAST)
        if spec.reply is not None:
            spec.reply.write(out, value, self.ctx)

    def send_error(self, message: str, status: int = 1) -> None:
        """Queue STDERR_ERROR in the layout of the client's minor."""
        if self.ctx is None:
            # before the handshake completed: assume a modern client
            write_stderr(self._out, Error(message, status), Ctx(self.server_minor))
        else:
            write_stderr(self._out, Error(message, status), self.ctx)

    def send_raw(self, data: bytes) -> None:
        """Queue raw bytes (e.g. the NAR after ``send_reply(Op.NAR_FROM_PATH)``)."""
        self._out += data


class ClientConnection(_Base):
    """We are a Nix client talking to a daemon."""

    def __init__(
        self,
        client_minor: int = SERVER_MINOR_DEFAULT,
        features: frozenset[str] = frozenset(),
        *,
        max_string: int = MAX_STRING_LEN,
        max_list: int = MAX_LIST_LEN,
    ) -> None:
        super().__init__(max_string, max_list)
        self.client_minor = client_minor
        self.features = frozenset(features)
        self._state = Phase.NEW
        self._pending: deque[OpSpec | None] = deque()  # None = the handshake's STDERR_LAST
        self._handshake: HandshakeDone | None = None
        self._stream_kind = StreamKind.NONE

    def initiate(self) -> None:
        """Queue the magic and our version and start the handshake."""
        if self._state is not Phase.NEW:
            raise RuntimeError("already initiated")
        self._send(client_hello(self.client_minor))
        gen = client_handshake(self._send, self.client_minor, self.features, self._limits)
        self._dec = Decoder(gen, "handshake")
        self._state = Phase.HANDSHAKE

    def next_event(self) -> Event:
        """The next event, or ``NEED_DATA``. Raises ``ProtocolError`` on bad input."""
        buf = self._buf
        while True:
            state = self._state
            if state is Phase.STDERR:
                assert self._dec is not None and self.ctx is not None
                if not self._dec.step(buf):
                    return NEED_DATA
                msg = self._dec.value
                spec = self._pending[0]
                if isinstance(msg, Last):
                    if spec is None:
                        self._pending.popleft()
                        self._state = Phase.IDLE
                        assert self._handshake is not None
                        return self._handshake
                    if spec.reply is None:
                        return self._finish_reply(None)
                    self._dec = Decoder(spec.reply.read(self.ctx), f"{spec.op.name} reply")
                    self._state = Phase.REPLY
                elif isinstance(msg, Error):
                    self._pending.popleft()
                    self._state = Phase.IDLE
                    return ErrorReply(msg)
                else:
                    self._dec = Decoder(read_stderr(self.ctx), "log message")
                    return Log(msg)
            elif state is Phase.REPLY:
                assert self._dec is not None
                if not self._dec.step(buf):
                    return NEED_DATA
                return self._finish_reply(self._dec.value)
            elif state is Phase.IDLE:
                if self._pending:
                    assert self.ctx is not None
                    self._dec = Decoder(read_stderr(self.ctx), "log message")
                    self._state = Phase.STDERR
                    continue
                if len(buf):
                    raise ProtocolError("unexpected data from the daemon", buf.offset)
                if buf.eof:
                    self._state = Phase.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            elif state is Phase.NAR:
                return self._read_nar()
            elif state is Phase.HANDSHAKE:
                assert self._dec is not None
                if not self._dec.step(buf):
                    return NEED_DATA
                done: HandshakeDone = self._dec.value
                self._handshake = done
                self.ctx = Ctx(
                    done.minor, done.features, self._limits.max_string, self._limits.max_list
                )
                self._pending.append(None)
                self._state = Phase.IDLE
            elif state is Phase.NEW:
                raise RuntimeError("call initiate() first")
            else:
                return ConnectionClosed()

    def _finish_reply(self, value: Any) -> Event:
        spec = self._pending.popleft()
        assert spec is not None
        if spec.reply_stream is StreamKind.NAR:
            self._start_nar()
        else:
            self._state = Phase.IDLE
        return Reply(spec.op, value)

    # -- sending

    def send_request(self, op: Op | int, args: dict[str, Any] | None = None) -> None:
        """Queue a request; for ops with a trailing stream follow with ``send_data``..."""
        if self.ctx is None or self._state in (Phase.HANDSHAKE, Phase.NEW):
            raise RuntimeError("handshake not complete")
        spec = op_spec(op)
        self._out += u64(spec.op)
        spec.request.write(self._out, args or {}, self.ctx)
        self._pending.append(spec)
        self._stream_kind = spec.stream(self.ctx.minor)

    def send_data(self, chunk: bytes) -> None:
        """Queue a piece of the current request's stream (framed, or raw for plain NARs)."""
        if not chunk:
            return
        if self._stream_kind is StreamKind.FRAMED:
            for i in range(0, len(chunk), MAX_FRAME_LEN):
                part = chunk[i : i + MAX_FRAME_LEN]
                self._out += u64(len(part))
                self._out += part
        elif self._stream_kind is StreamKind.NAR:
            self._out += chunk
        else:
            raise RuntimeError(f"the current request has no {self._stream_kind.value} stream")

    def send_end_of_data(self) -> None:
        """End the current request's stream (the framed terminator; nothing for plain NARs)."""
        if self._stream_kind is StreamKind.FRAMED:
            self._out += u64(0)
        self._stream_kind = StreamKind.NONE

    def send_tunnel_data(self, data: bytes) -> None:
        """Answer a ``Log(Read(n))`` (STDERR_READ) with up to n bytes."""
        write_bytes(self._out, data)
