"""NAR (Nix ARchive): sans-IO streaming parser, writer from the filesystem, restore, scanning.

Grammar (NI §1.6): every token is a padded string (u64 little-endian length, bytes, zero
padding to a multiple of 8)::

    nar   = "nix-archive-1" node
    node  = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
                       | "symlink" "target" <str>
                       | "directory" { "entry" "(" "name" <str> "node" node ")" } ) ")"

Directory entries are sorted bytewise and unique.  The parser accepts only this canonical
form (the one Nix writes).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass

from recnix.formats.storepath import HASH_PART_LEN, NIX32_ALPHABET, nix32_encode

NAR_MAGIC = b"nix-archive-1"
MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4096
MAX_FILE_SIZE = (1 << 63) - 1
CHUNK_SIZE = 1 << 16

# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Directory:
    """A directory starts; `path` is relative to the NAR root ("" for the root)."""

    path: str


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symbolic link and its target (raw bytes)."""

    path: str
    target: bytes


@dataclass(frozen=True, slots=True)
class File:
    """A regular file starts; Contents events follow, then FileEnd."""

    path: str
    executable: bool
    size: int


@dataclass(frozen=True, slots=True)
class Contents:
    """A piece of the current regular file's contents."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FileEnd:
    """The current regular file is complete."""

    path: str


NarEvent = Directory | Symlink | File | Contents | FileEnd

# --- parser --------------------------------------------------------------------------------

_Request = tuple[str, int]  # ("read", n) exact bytes, or ("stream", n) file contents


def _padded(n: int) -> int:
    return (n + 7) & ~7


class NarParser:
    """Sans-IO streaming NAR parser.

    `feed(data)` returns how many leading bytes of `data` belong to the NAR; it never
    consumes bytes past the NAR's end.  `done` becomes True once the NAR is complete.
    Malformed input raises `ProtocolError` with the byte offset of the offending token.
    Events (see `NarEvent`) go to `on_event` if given, and are queued for `events()` if
    `record_events` is true.  File contents are passed through, never buffered whole.
    """

    def __init__(
        self,
        on_event: Callable[[NarEvent], None] | None = None,
        *,
        record_events: bool = False,
        max_name_len: int = MAX_NAME_LEN,
        max_target_len: int = MAX_TARGET_LEN,
        max_file_size: int = MAX_FILE_SIZE,
    ) -> None:
        self._on_event = on_event
        self._record = record_events
        self._queue: list[NarEvent] = []
        self._max_name_len = max_name_len
        self._max_target_len = max_target_len
        self._max_file_size = max_file_size
        self._buf = bytearray()
        self._offset = 0  # bytes consumed so far
        self._token_start = 0
        self._failed: ProtocolError | None = None
        self._done = False
        self._gen = self._grammar()
        self._req: _Request = next(self._gen)
        self._stream_left = 0

    @property
    def done(self) -> bool:
        """True once the complete NAR has been consumed."""
        return self._done

    @property
    def offset(self) -> int:
        """Number of NAR bytes consumed so far."""
        return self._offset

    def events(self) -> list[NarEvent]:
        """Drain the queued events (only with `record_events=True`)."""
        queued, self._queue = self._queue, []
        return queued

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume NAR bytes from `data`; return how many leading bytes were consumed."""
        if self._failed is not None:
            raise self._failed
        mv = memoryview(data).cast("B")
        end = len(mv)
        pos = 0
        try:
            while not self._done and pos < end:
                if self._stream_left:
                    take = min(self._stream_left, end - pos)
                    self._emit(Contents(bytes(mv[pos : pos + take])))
                    pos += take
                    self._offset += take
                    self._stream_left -= take
                    if not self._stream_left:
                        self._advance(b"")
                    continue
                need = self._req[1] - len(self._buf)
                take = min(need, end - pos)
                self._buf += mv[pos : pos + take]
                pos += take
                self._offset += take
                if take == need:
                    value = bytes(self._buf)
                    self._buf.clear()
                    self._advance(value)
        except ProtocolError as e:
            self._failed = e
            raise
        finally:
            # the kept error's traceback holds this frame: without this, its view would
            # pin the caller's buffer (a bytearray that can then no longer grow)
            mv.release()
        return pos

    def _emit(self, event: NarEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
        if self._record:
            self._queue.append(event)

    def _advance(self, value: bytes) -> None:
        """Give the grammar the bytes it asked for; set up its next request."""
        while True:
            try:
                req = self._gen.send(value)
            except StopIteration:
                self._done = True
                return
            if req[0] == "stream":
                if req[1]:
                    self._stream_left = req[1]
                    self._req = req
                    return
                value = b""  # empty file: nothing to stream
                continue
            self._req = req
            return

    def _error(self, message: str) -> ProtocolError:
        return ProtocolError(f"NAR: {message}", self._token_start)

    # The grammar is a generator that yields requests and receives the bytes.

    def _u64(self) -> Generator[_Request, bytes, int]:
        self._token_start = self._offset
        raw = yield ("read", 8)
        return int.from_bytes(raw, "little")

    def _str(self, max_len: int, what: str) -> Generator[_Request, bytes, bytes]:
        n = yield from self._u64()  # sets _token_start: errors point at the length prefix
        if n > max_len:
            raise self._error(f"{what} length {n} exceeds limit {max_len}")
        if not n:
            return b""
        raw = yield ("read", _padded(n))
        if any(raw[n:]):
            raise self._error(f"non-zero padding after {what}")
        return raw[:n]

    def _expect(self, token: bytes) -> Generator[_Request, bytes, None]:
        got = yield from self._str(64, "token")
        if got != token:
            raise self._error(f"expected {token.decode()!r}, got {got!r}")

    def _grammar(self) -> Generator[_Request, bytes, None]:
        magic = yield from self._str(64, "magic")
        if magic != NAR_MAGIC:
            raise self._error(f"bad archive magic {magic!r}")
        # Each frame: [directory path, previous entry name].
        stack: list[list] = []
        path = ""
        while True:
            # Parse the node at `path`.
            yield from self._expect(b"(")
            yield from self._expect(b"type")
            kind = yield from self._str(64, "node type")
            if kind == b"regular":
                tok = yield from self._str(64, "token")
                executable = tok == b"executable"
                if executable:
                    marker = yield from self._str(64, "executable marker")
                    if marker:
                        raise self._error("executable marker has a non-empty value")
                    tok = yield from self._str(64, "token")
                if tok != b"contents":
                    raise self._error(f"expected 'contents', got {tok!r}")
                size = yield from self._u64()
                if size > self._max_file_size:
                    raise self._error(f"file size {size} exceeds limit {self._max_file_size}")
                self._emit(File(path, executable, size))
                yield ("stream", size)
                if size % 8:
                    self._token_start = self._offset
                    pad = yield ("read", 8 - size % 8)
                    if any(pad):
                        raise self._error("non-zero padding after file contents")
                self._emit(FileEnd(path))
                yield from self._expect(b")")
            elif kind == b"symlink":
                yield from self._expect(b"target")
                target = yield from self._str(self._max_target_len, "symlink target")
                if not target:
                    raise self._error("empty symlink target")
                self._emit(Symlink(path, target))
                yield from self._expect(b")")
            elif kind == b"directory":
                self._emit(Directory(path))
                stack.append([path, None])
            else:
                raise self._error(f"unknown node type {kind!r}")
            # Find the next node to parse, closing finished directories and entries.
            node_open = kind == b"directory"
            while True:
                if not node_open:
                    if not stack:
                        return
                    yield from self._expect(b")")  # closes the "entry"
                frame = stack[-1]
                tok = yield from self._str(64, "token")
                if tok == b")":
                    stack.pop()
                    node_open = False
                    continue
                if tok != b"entry":
                    raise self._error(f"expected 'entry' or ')', got {tok!r}")
                yield from self._expect(b"(")
                yield from self._expect(b"name")
                name = yield from self._str(self._max_name_len, "entry name")
                if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
                    raise self._error(f"invalid entry name {name!r}")
                prev = frame[1]
                if prev is not None and name <= prev:
                    raise self._error(
                        f"directory entries not sorted or duplicated: {prev!r} then {name!r}"
                    )
                frame[1] = name
                yield from self._expect(b"node")
                dname = os.fsdecode(name)
                path = f"{frame[0]}/{dname}" if frame[0] else dname
                break


# --- writer --------------------------------------------------------------------------------


def _tok(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (_padded(len(data)) - len(data))


_OPEN_TYPE = _tok(b"(") + _tok(b"type")
_CLOSE = _tok(b")")


def dump_path(path: str | os.PathLike[str] | bytes) -> Iterator[bytes]:
    """Stream the NAR serialisation of `path` (byte-identical to `nix-store --dump`)."""
    out = bytearray(_tok(NAR_MAGIC))
    # Work stack: (filesystem path, entry name or None) for a node to write, or
    # (None, bytes) for closing tokens to write once a directory's entries are done.
    work: list[tuple[bytes | None, bytes | None]] = [(os.fsencode(path), None)]
    while work:
        fs_path, name = work.pop()
        if fs_path is None:
            out += name or b""
            continue
        if name is not None:
            out += _tok(b"entry") + _tok(b"(") + _tok(b"name") + _tok(name) + _tok(b"node")
        closer = _CLOSE if name is None else _CLOSE + _CLOSE
        st = os.lstat(fs_path)
        out += _OPEN_TYPE
        if stat.S_ISREG(st.st_mode):
            out += _tok(b"regular")
            if st.st_mode & stat.S_IXUSR:
                out += _tok(b"executable") + _tok(b"")
            out += _tok(b"contents") + st.st_size.to_bytes(8, "little")
            written = 0
            with open(fs_path, "rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    written += len(chunk)
                    if written > st.st_size:
                        raise OSError(f"file {os.fsdecode(fs_path)!r} grew while dumping it")
                    if out:
                        yield bytes(out)
                        out.clear()
                    yield chunk
            if written != st.st_size:
                raise OSError(f"file {os.fsdecode(fs_path)!r} changed size while dumping it")
            out += b"\0" * (_padded(written) - written) + closer
        elif stat.S_ISLNK(st.st_mode):
            out += _tok(b"symlink") + _tok(b"target") + _tok(os.readlink(fs_path)) + closer
        elif stat.S_ISDIR(st.st_mode):
            out += _tok(b"directory")
            work.append((None, closer))
            for child in sorted(os.listdir(fs_path), reverse=True):
                work.append((os.path.join(fs_path, child), child))
        else:
            raise OSError(f"file {os.fsdecode(fs_path)!r} has an unsupported type")
        if len(out) >= CHUNK_SIZE:
            yield bytes(out)
            out.clear()
    if out:
        yield bytes(out)


def nar_hash(path: str | os.PathLike[str]) -> tuple[str, int]:
    """The NAR hash ("sha256:<nix32>") and NAR size of `path`, as Nix records them."""
    h = hashlib.sha256()
    size = 0
    for chunk in dump_path(path):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + nix32_encode(h.digest()), size


# --- restore -------------------------------------------------------------------------------


class _Restorer:
    def __init__(self, dest: bytes) -> None:
        self.dest = dest
        self.fd: int | None = None

    def target(self, rel: str) -> bytes:
        return os.path.join(self.dest, os.fsencode(rel)) if rel else self.dest

    def __call__(self, ev: NarEvent) -> None:
        if isinstance(ev, Contents):
            assert self.fd is not None
            view = memoryview(ev.data)
            while view:
                view = view[os.write(self.fd, view) :]
        elif isinstance(ev, File):
            self.fd = os.open(
                self.target(ev.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666
            )
            if ev.executable:
                mode = os.fstat(self.fd).st_mode
                os.fchmod(self.fd, stat.S_IMODE(mode) | 0o111)
        elif isinstance(ev, FileEnd):
            assert self.fd is not None
            os.close(self.fd)
            self.fd = None
        elif isinstance(ev, Directory):
            os.mkdir(self.target(ev.path), 0o777)
        elif isinstance(ev, Symlink):
            os.symlink(ev.target, self.target(ev.path))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def restore_nar(chunks: Iterable[bytes], dest: str | os.PathLike[str]) -> None:
    """Recreate the NAR given as `chunks` at `dest` (which must not exist yet).

    Raises ProtocolError if the NAR is malformed, truncated, or followed by extra bytes.
    """
    restorer = _Restorer(os.fsencode(dest))
    parser = NarParser(restorer)
    try:
        for chunk in chunks:
            used = parser.feed(chunk)
            if used < len(chunk):
                raise ProtocolError(
                    "NAR: trailing data after the end of the archive", parser.offset
                )
        if not parser.done:
            raise ProtocolError("NAR: truncated archive", parser.offset)
    finally:
        restorer.close()


# --- reference scanning --------------------------------------------------------------------

_NIX32_RUN = re.compile(b"[" + NIX32_ALPHABET.encode() + b"]{%d,}" % HASH_PART_LEN)


def scan_for_hashes(path: str | os.PathLike[str], hash_parts: Iterable[str]) -> set[str]:
    """Which of `hash_parts` occur in the NAR serialisation of `path` (streamed).

    Like Nix's reference scanner: file contents, symlink targets and file names all count,
    and occurrences spanning chunk boundaries are found.
    """
    wanted: set[bytes] = set()
    for h in hash_parts:
        if len(h) != HASH_PART_LEN or any(c not in NIX32_ALPHABET for c in h):
            raise ValueError(f"not a nix32 hash part: {h!r}")
        wanted.add(h.encode())
    if not wanted:
        return set()
    # Every occurrence at p covers an 8-aligned 8-byte block at p + d (0 <= d < 8) that
    # ends inside it, so looking up only aligned blocks of each nix32 run finds them all.
    anchors: dict[bytes, list[tuple[bytes, int]]] = {}
    for h in wanted:
        for d in range(8):
            anchors.setdefault(h[d : d + 8], []).append((h, d))
    found: set[bytes] = set()
    carry = b""
    for chunk in dump_path(path):
        buf = carry + chunk
        for m in _NIX32_RUN.finditer(buf):
            run = m.group()
            last = len(run) - HASH_PART_LEN
            for q in range(0, len(run) - 7, 8):
                for h, d in anchors.get(run[q : q + 8], ()):
                    p = q - d
                    if 0 <= p <= last and run[p : p + HASH_PART_LEN] == h:
                        found.add(h)
        if len(found) == len(wanted):
            break
        carry = buf[-(HASH_PART_LEN - 1) :]
    return {h.decode() for h in found}


# Imported last: recnix.protocol's package __init__ imports recnix.protocol.connection, which
# imports NarParser from here; by now NarParser exists, so either import order works.
from recnix.protocol.errors import ProtocolError  # noqa: E402

__all__ = [
    "NAR_MAGIC",
    "Contents",
    "Directory",
    "File",
    "FileEnd",
    "NarEvent",
    "NarParser",
    "Symlink",
    "dump_path",
    "nar_hash",
    "restore_nar",
    "scan_for_hashes",
]
