"""The AddMultipleToStore inner stream (NI §1.6), carried inside the framed data.

Layout: ``u64 count``, then per path a ValidPathInfo at format 16 followed by
that path's plain NAR. :class:`MultipleParser` is sans-IO and streams each NAR
as ``Data`` events; the encoders build the non-NAR parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from recnix.protocol.nar import NarParser

from .connection import NEED_DATA, Data, EndOfData, _NeedData, feed_nar
from .errors import ProtocolError
from .schema import VALID_PATH_INFO_16
from .types import ValidPathInfo
from .wire import MAX_LIST_LEN, MAX_STRING_LEN, Ctx, Decoder, ReceiveBuffer, encode, u64


@dataclass
class NarStart:
    """The next path's info; its NAR follows as ``Data`` events, then ``NarEnd``."""

    info: ValidPathInfo
    index: int
    count: int


@dataclass
class NarEnd:
    """The current path's NAR is complete (and had ``info.nar_size`` bytes)."""


MultipleEvent = _NeedData | NarStart | Data | NarEnd | EndOfData


class MultipleParser:
    """Parses the (already unframed) AddMultipleToStore stream.

    ``receive_data(b"")`` signals the end of the framed stream; ``EndOfData`` is
    returned once all announced paths were read and the input ended.
    """

    def __init__(self, *, max_string: int = MAX_STRING_LEN, max_list: int = MAX_LIST_LEN) -> None:
        self._buf = ReceiveBuffer()
        self._ctx = Ctx(16, frozenset(), max_string, max_list)
        self._count: int | None = None
        self._index = 0
        self._dec: Decoder | None = Decoder(_read_count(), "path count")
        self._nar: NarParser | None = None
        self._nar_left = 0
        self._info: ValidPathInfo | None = None

    def receive_data(self, data: bytes) -> None:
        """Add bytes of the inner stream; ``b""`` signals its end."""
        if not data:
            self._buf.eof = True
        else:
            self._buf.feed(data)

    def next_event(self) -> MultipleEvent:
        """The next event, or ``NEED_DATA``. Raises ``ProtocolError`` on bad input."""
        buf = self._buf
        while True:
            if self._nar is not None:
                nar = self._nar
                if nar.done:
                    if self._nar_left:
                        raise ProtocolError(
                            f"NAR is {self._nar_left} bytes shorter than its narSize", buf.offset
                        )
                    self._nar = None
                    self._index += 1
                    return NarEnd()
                if not len(buf):
                    if buf.eof:
                        raise ProtocolError("unexpected end of stream in NAR", buf.offset)
                    return NEED_DATA
                with buf.peek(len(buf)) as view:
                    n = feed_nar(nar, view, buf.offset)
                if n > self._nar_left:
                    raise ProtocolError("NAR is longer than its narSize", buf.offset)
                self._nar_left -= n
                if n:
                    return Data(buf.take(n))
                continue
            if self._dec is not None:
                if not self._dec.step(buf):
                    return NEED_DATA
                value = self._dec.value
                self._dec = None
                if self._count is None:
                    self._count = value
                    continue
                info: ValidPathInfo = value
                self._nar = NarParser()
                self._nar_left = info.info.nar_size
                return NarStart(info, self._index, self._count)
            assert self._count is not None
            if self._index < self._count:
                self._dec = Decoder(VALID_PATH_INFO_16.read(self._ctx), "path info")
                continue
            if len(buf):
                raise ProtocolError("data after the last path", buf.offset)
            if buf.eof:
                return EndOfData()
            return NEED_DATA


def _read_count():  # type: ignore[no-untyped-def]
    data = yield 8
    n = int.from_bytes(data, "little")
    if n > MAX_LIST_LEN:
        raise ProtocolError(f"{n} paths exceed the limit of {MAX_LIST_LEN}")
    return n


def encode_multiple_header(count: int) -> bytes:
    """The stream's first 8 bytes: the number of paths."""
    return u64(count)


def encode_multiple_entry(info: ValidPathInfo) -> bytes:
    """One path's info (format 16); the caller appends the path's NAR after it."""
    return encode(VALID_PATH_INFO_16, info, Ctx(16))
