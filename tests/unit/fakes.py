"""An in-memory Store and session for testing RestrictedStore without root or Nix.

Used by tests/unit/store/test_restricted.py and scripts/fuzz_session.py. The fake store
keeps paths (info + content) in dicts; building a derivation makes its outputs
valid and records it in ``ran``.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from recnix.formats.derivation import Derivation, DerivationError, parse_derivation, to_aterm_bytes
from recnix.formats.storepath import NIX32_ALPHABET, InvalidStorePath, validate_store_path
from recnix.protocol import (
    BuildResult,
    DerivedPath,
    KeyedBuildResult,
    Missing,
    Next,
    PathInfo,
    ProtocolError,
    StderrMessage,
    ValidPathInfo,
)
from recnix.protocol.nar import Contents, NarParser
from recnix.store.policy import Limits
from recnix.store.seam import StoreError
from recnix.store.upstream import UpstreamError

STORE = "/nix/store/"


def store_path(name: str, seed: str = "") -> str:
    """A well-formed store path for ``name`` (deterministic in ``seed``)."""
    digest = hashlib.sha256((seed + "\0" + name).encode("utf-8", "surrogateescape")).digest()
    return STORE + "".join(NIX32_ALPHABET[b % 32] for b in digest[:32]) + "-" + name


def new_path(name: str, seed: str) -> str:
    """store_path, refusing a name Nix refuses (as the daemon: an error reply)."""
    path = store_path(name, seed)
    try:
        return validate_store_path(path)
    except InvalidStorePath as e:
        raise UpstreamError(f"invalid name '{name}': {e}") from None


def _tok(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


def nar_of(content: bytes) -> bytes:
    """The NAR of a regular file holding ``content``."""
    return b"".join(
        _tok(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", content, b")")
    )


def nar_contents(nar: bytes) -> bytes:
    """A regular file's contents from its NAR; UpstreamError, as Nix's, if it is cut short."""
    parser = NarParser(record_events=True)
    try:
        parser.feed(nar)
    except ProtocolError as e:
        raise UpstreamError(f"bad archive: {e}") from e
    if not parser.done:
        raise UpstreamError("unexpected end-of-file in the NAR")
    return b"".join(e.data for e in parser.events() if isinstance(e, Contents))


async def _collect(data: AsyncIterable[bytes] | Iterable[bytes]) -> bytes:
    out = bytearray()
    if isinstance(data, AsyncIterable):
        async for chunk in data:
            out += chunk
    else:
        for chunk in data:
            out += chunk
    return bytes(out)


@dataclass
class FakeStore:
    """Paths by store path: contents (a .drv's text) and PathInfo."""

    contents: dict[str, bytes] = field(default_factory=dict)
    infos: dict[str, PathInfo] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # derivations built, in order
    kept: set[str] = field(default_factory=set)  # Store.keep: the session's temp roots
    fail_builds: bool = False

    def put(self, path: str, content: bytes = b"x", references: Iterable[str] = ()) -> str:
        self.contents[path] = content
        self.infos[path] = PathInfo(
            deriver=store_path("deriver.drv", path),
            nar_hash=hashlib.sha256(nar_of(content)).hexdigest(),
            references=sorted(references),
            registration_time=1234,
            nar_size=len(content),
            ultimate=True,
            sigs=["cache:sig"],
        )
        return path

    def put_drv(self, drv: Derivation, name: str, refs: bool = True) -> str:
        """Store ``drv`` as ``<hash>-<name>.drv``; ``refs``: with its inputs as references
        (as Nix registers a derivation), else none (a source that happens to be a .drv)."""
        text = to_aterm_bytes(drv)
        path = store_path(name + ".drv", text.decode())
        references = [*drv.input_srcs, *drv.input_drvs] if refs else []
        return self.put(path, text, references)

    # -- the Store protocol

    async def query_path_info(self, path: str) -> PathInfo | None:
        return self.infos.get(path)

    async def query_valid_paths(self, paths: Iterable[str], substitute: bool = False) -> list[str]:
        return [p for p in paths if p in self.infos]

    async def keep(self, paths: Iterable[str]) -> None:
        for path in paths:
            if path not in self.infos:
                raise StoreError(f"path '{path}' is not valid")
            self.kept.add(path)

    def _drv(self, drv_path: str) -> Derivation:
        drv = self.read_derivation(drv_path)
        if drv is None:
            raise UpstreamError(f"path '{drv_path}' is not a valid derivation")
        return drv

    async def query_derivation_outputs(self, drv_path: str) -> list[str]:
        return [o.path for o in self._drv(drv_path).outputs.values() if o.path]

    async def query_derivation_output_names(self, drv_path: str) -> list[str]:
        return list(self._drv(drv_path).outputs)

    async def query_derivation_output_map(self, drv_path: str) -> dict[str, str | None]:
        return {n: o.path for n, o in self._drv(drv_path).outputs.items()}

    async def query_missing(self, targets: list[DerivedPath]) -> Missing:
        return Missing(will_build=[t.path for t in targets if t.path not in self.infos])

    async def query_realisation(self, rid: str) -> Any:
        return []

    async def add_to_store(
        self,
        name: str,
        ca_method: str,
        references: Iterable[str],
        data: AsyncIterable[bytes] | Iterable[bytes],
    ) -> ValidPathInfo:
        content = await _collect(data)
        if ca_method.startswith("fixed:r:"):
            content = nar_contents(content)
        path = new_path(name, content.decode(errors="replace") + ca_method)
        self.put(path, content, references)
        return ValidPathInfo(path, self.infos[path])

    async def add_to_store_nar(
        self, info: ValidPathInfo, data: AsyncIterable[bytes] | Iterable[bytes]
    ) -> None:
        nar = await _collect(data)
        if info.path in self.infos:
            return  # as Nix's daemon: an already-valid path is accepted, its NAR unread
        self.put(info.path, nar_contents(nar), info.info.references)

    def _build(self, targets: list[DerivedPath]) -> list[KeyedBuildResult]:
        if self.fail_builds:
            raise UpstreamError("build of the fake derivation failed")
        results = []
        for t in targets:
            if t.is_built:
                self._realise(t.path)
            elif t.path not in self.infos:
                raise UpstreamError(f"path '{t.path}' is not valid")
            results.append(KeyedBuildResult(t, BuildResult(status=0)))
        return results

    def _realise(self, drv_path: str) -> None:
        drv = self._drv(drv_path)
        outs = [o.path for o in drv.outputs.values()]
        if all(o and o in self.infos for o in outs):
            return
        for dep in drv.input_drvs:
            self._realise(dep)
        self.ran.append(drv_path)
        for o in outs:
            if o:
                self.put(o, b"built from " + drv_path.encode(), drv.input_srcs)

    async def build_paths(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: Any = None,
        hooks: bool = True,
    ) -> None:
        await self._log(on_log, targets)
        self._build(targets)

    async def build_paths_with_results(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: Any = None,
        hooks: bool = True,
    ) -> list[KeyedBuildResult]:
        await self._log(on_log, targets)
        return self._build(targets)

    async def _log(self, on_log: Any, targets: list[DerivedPath]) -> None:
        if on_log is not None:
            await on_log(Next(f"building {' '.join(t.path for t in targets)}"))

    def read_derivation(self, drv_path: str) -> Derivation | None:
        text = self.contents.get(drv_path)
        if text is None or not drv_path.endswith(".drv"):
            return None
        try:
            return parse_derivation(text, name=drv_path[len(STORE) + 33 : -4])
        except (DerivationError, UnicodeDecodeError, ValueError):
            return None

    def path_exists(self, path: str) -> bool:
        return path in self.infos

    def dump(self, path: str) -> Iterator[bytes]:
        yield self.contents[path]


# the policy limits of the unit tests' sessions
LIMITS = Limits(
    max_depth=4,
    max_builds=0,
    max_added_bytes=0,
    allow_fixed_output=False,
    max_connections=64,
)


@dataclass
class FakeSession:
    """The session state RestrictedStore uses (recnix.store.restricted.SessionState)."""

    store: FakeStore
    allowed: set[str]
    drv_path: str = store_path("outer.drv")
    limits: Limits = field(default_factory=lambda: LIMITS)
    sid: str = "fake"
    readonly: bool = False
    depth: int = 1
    realisations: set[str] = field(default_factory=set)
    path_infos: dict[str, PathInfo] = field(default_factory=dict)
    builds: int = 0
    added_bytes: int = 0
    sound_drvs: set[str] = field(default_factory=set)
    drv_cache: dict[str, Derivation | None] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    build_requests: set[str] = field(default_factory=set)

    @property
    def ancestry(self) -> set[str]:
        return {self.drv_path}

    async def allow(self, paths: Iterable[str], event: str) -> None:
        unkept = set(paths) - self.store.kept
        assert not unkept, f"allowed before the store kept them: {sorted(unkept)}"
        for p in sorted(set(paths) - self.allowed):
            self.allowed.add(p)
            self.audit(event, path=p)

    # what a connection asks of its session (recnix.daemon.connection.ServedSession)
    keeper = None
    hooks_optional = True

    def note_build_request(self, drv_paths: Iterable[str]) -> None:
        self.builds += 1
        self.build_requests |= {p for p in drv_paths if p.endswith(".drv")}

    def journal_change(self, **change: Any) -> None:
        pass

    def audit(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


@dataclass
class FakeClient:
    """A client connection: its protocol minor, pid and the current request's stream."""

    data: list[bytes] = field(default_factory=list)
    minor: int = 35
    pid: int = 4242
    fail_after: int | None = None  # chunks before the stream breaks (a client abort)
    logs: list[StderrMessage] = field(default_factory=list)

    async def stream(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self.data):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionResetError("the client's connection was lost")
            yield chunk

    async def log(self, msg: StderrMessage) -> None:
        self.logs.append(msg)
