"""The server→client log stream: STDERR_* messages (NI §1.4), encoded per minor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError
from .wire import (
    Ctx,
    Gen,
    Stderr,
    decode_str,
    encode_str,
    read_bytes,
    read_count,
    read_u64,
    u64,
    write_bytes,
)


@dataclass
class Next:
    """STDERR_NEXT: a log line (printed by the client)."""

    text: str


@dataclass
class Read:
    """STDERR_READ: the server asks for up to ``length`` bytes of data."""

    length: int


@dataclass
class Write:
    """STDERR_WRITE: data for the client's sink (ExportPath)."""

    data: bytes


@dataclass
class Last:
    """STDERR_LAST: the reply follows."""


@dataclass
class Error:
    """STDERR_ERROR. At minor >= 26 status is not sent; below 26 level/name/traces are not."""

    message: str
    status: int = 1
    level: int = 0
    name: str = "Error"
    traces: list[str] = field(default_factory=list)


@dataclass
class StartActivity:
    """STDERR_START_ACTIVITY (minor >= 20; older clients get a NEXT line)."""

    id: int
    level: int
    type: int
    text: str
    fields: list[int | str] = field(default_factory=list)
    parent: int = 0


@dataclass
class StopActivity:
    """STDERR_STOP_ACTIVITY (minor >= 20; dropped for older clients)."""

    id: int


@dataclass
class Result:
    """STDERR_RESULT (minor >= 20; dropped for older clients)."""

    id: int
    type: int
    fields: list[int | str] = field(default_factory=list)


StderrMessage = Next | Read | Write | Last | Error | StartActivity | StopActivity | Result


def _write_fields(out: bytearray, fields: list[int | str]) -> None:
    out += u64(len(fields))
    for f in fields:
        if isinstance(f, int):
            out += u64(0) + u64(f)
        else:
            out += u64(1)
            write_bytes(out, encode_str(f))


def _read_fields(ctx: Ctx) -> Gen:
    n = yield from read_count(ctx, "activity field list")
    fields: list[int | str] = []
    for _ in range(n):
        kind = yield from read_u64()
        if kind == 0:
            fields.append((yield from read_u64()))
        elif kind == 1:
            fields.append(decode_str((yield from read_bytes(ctx.max_string))))
        else:
            raise ProtocolError(f"bad activity field type {kind}")
    return fields


def _write_next(out: bytearray, msg: Next, ctx: Ctx) -> None:
    out += u64(Stderr.NEXT)
    write_bytes(out, encode_str(msg.text))


def _write_read(out: bytearray, msg: Read, ctx: Ctx) -> None:
    out += u64(Stderr.READ) + u64(msg.length)


def _write_write(out: bytearray, msg: Write, ctx: Ctx) -> None:
    out += u64(Stderr.WRITE)
    write_bytes(out, msg.data)


def _write_last(out: bytearray, msg: Last, ctx: Ctx) -> None:
    out += u64(Stderr.LAST)


def _write_error(out: bytearray, msg: Error, ctx: Ctx) -> None:
    out += u64(Stderr.ERROR)
    if ctx.minor >= 26:
        write_bytes(out, b"Error")
        out += u64(msg.level)
        write_bytes(out, encode_str(msg.name))
        write_bytes(out, encode_str(msg.message))
        out += u64(0) + u64(len(msg.traces))
        for trace in msg.traces:
            out += u64(0)
            write_bytes(out, encode_str(trace))
    else:
        write_bytes(out, encode_str(msg.message))
        out += u64(msg.status)


def _write_start_activity(out: bytearray, msg: StartActivity, ctx: Ctx) -> None:
    if ctx.minor < 20:  # no activities yet: its text as a log line
        if msg.text:
            _write_next(out, Next(msg.text + "...\n"), ctx)
        return
    out += u64(Stderr.START_ACTIVITY) + u64(msg.id) + u64(msg.level) + u64(msg.type)
    write_bytes(out, encode_str(msg.text))
    _write_fields(out, msg.fields)
    out += u64(msg.parent)


def _write_stop_activity(out: bytearray, msg: StopActivity, ctx: Ctx) -> None:
    if ctx.minor >= 20:
        out += u64(Stderr.STOP_ACTIVITY) + u64(msg.id)


def _write_result(out: bytearray, msg: Result, ctx: Ctx) -> None:
    if ctx.minor >= 20:
        out += u64(Stderr.RESULT) + u64(msg.id) + u64(msg.type)
        _write_fields(out, msg.fields)


# Each message type's writer (what a client at ctx.minor gets; nothing where it has none).
_WRITERS: dict[type, Callable[[bytearray, Any, Ctx], None]] = {
    Next: _write_next,
    Read: _write_read,
    Write: _write_write,
    Last: _write_last,
    Error: _write_error,
    StartActivity: _write_start_activity,
    StopActivity: _write_stop_activity,
    Result: _write_result,
}


def write_stderr(out: bytearray, msg: StderrMessage, ctx: Ctx) -> None:
    """Append ``msg`` as the server sends it to a client at ``ctx.minor``."""
    writer = _WRITERS.get(type(msg))
    if writer is None:
        raise TypeError(f"not a stderr message: {msg!r}")
    writer(out, msg, ctx)


def encode_stderr(msg: StderrMessage, ctx: Ctx) -> bytes:
    """``msg`` as bytes (empty if the client's minor has no such message)."""
    out = bytearray()
    write_stderr(out, msg, ctx)
    return bytes(out)


def _read_str(ctx: Ctx) -> Gen:
    return decode_str((yield from read_bytes(ctx.max_string)))


def _read_next(ctx: Ctx) -> Gen:
    return Next((yield from _read_str(ctx)))


def _read_read(ctx: Ctx) -> Gen:
    return Read((yield from read_u64()))


def _read_write(ctx: Ctx) -> Gen:
    return Write((yield from read_bytes(ctx.max_string)))


def _read_last(ctx: Ctx) -> Gen:
    return Last()
    yield  # a generator, like the others


def _read_error(ctx: Ctx) -> Gen:
    if ctx.minor < 26:
        message = yield from _read_str(ctx)
        return Error(message, status=(yield from read_u64()))
    kind = yield from _read_str(ctx)
    if kind != "Error":
        raise ProtocolError(f"error type must be 'Error', got {kind!r}")
    level = yield from read_u64()
    name = yield from _read_str(ctx)
    message = yield from _read_str(ctx)
    if (yield from read_u64()) != 0:
        raise ProtocolError("error position is not supported")
    n = yield from read_count(ctx, "error trace list")
    traces = []
    for _ in range(n):
        if (yield from read_u64()) != 0:
            raise ProtocolError("error trace position is not supported")
        traces.append((yield from _read_str(ctx)))
    return Error(message, 1, level, name, traces)


def _read_start_activity(ctx: Ctx) -> Gen:
    act, level, typ = (yield from read_u64()), (yield from read_u64()), (yield from read_u64())
    text = yield from _read_str(ctx)
    fields = yield from _read_fields(ctx)
    return StartActivity(act, level, typ, text, fields, (yield from read_u64()))


def _read_stop_activity(ctx: Ctx) -> Gen:
    return StopActivity((yield from read_u64()))


def _read_result(ctx: Ctx) -> Gen:
    act, typ = (yield from read_u64()), (yield from read_u64())
    return Result(act, typ, (yield from _read_fields(ctx)))


# Each tag's reader (the message after its tag).
_READERS: dict[int, Callable[[Ctx], Gen]] = {
    Stderr.NEXT: _read_next,
    Stderr.READ: _read_read,
    Stderr.WRITE: _read_write,
    Stderr.LAST: _read_last,
    Stderr.ERROR: _read_error,
    Stderr.START_ACTIVITY: _read_start_activity,
    Stderr.STOP_ACTIVITY: _read_stop_activity,
    Stderr.RESULT: _read_result,
}


def read_stderr(ctx: Ctx) -> Gen:
    """Decoder generator for one stderr message (tag included)."""
    tag = yield from read_u64()
    reader = _READERS.get(tag)
    if reader is None:
        raise ProtocolError(f"unknown stderr message tag {tag:#x}")
    return (yield from reader(ctx))
