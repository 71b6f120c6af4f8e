"""The restricted store: every op's semantics for one opted-in build, in one place.

``RestrictedStore(store, session, client)`` serves the worker-protocol ops a
sandboxed client sends, over a :class:`recnix.store.seam.Store` (the upstream
nix-daemon, or a fake in the unit tests). One method per op, named after it
(``Op.QUERY_PATH_INFO`` -> ``query_path_info``), takes the decoded request
arguments and returns the reply value, or raises :class:`~recnix.store.policy.Denied`
with the message the client sees. A plain ``def`` may return an awaitable when
it needs I/O; an ``async def`` always does. Adding an op is a ``schema.py``
entry plus one method here; an op with no method is refused.

What each op does (nix-internals §6.4, and Nix's own RestrictedStore):

- allow: queries of *allowed* paths (input closure ∪ added ∪ built) are
  answered, path infos censored (no deriver, signatures, registration time);
- forward: adds and builds, after the checks of the one rule
  (:mod:`recnix.store.policy`): declared references allowed, ``*.drv`` adds parsed
  and checked, builds checked over their whole derivation closure read from
  the ``.drv`` texts;
- censor: every other path looks invalid (IsValidPath false, QueryPathInfo
  none, QueryValidPaths filtered, QueryMissing unknown);
- inert: GC, roots, optimise, substitution queries answer as if done/empty;
- deny: repair, signatures, export/import, BuildDerivation, hash-part
  lookups, and everything not listed.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from recnix.config.names import OPT_IN_FEATURES
from recnix.formats.derivation import Derivation
from recnix.formats.storepath import nix32_to_base16
from recnix.protocol import (
    NEED_DATA,
    Data,
    DerivedPath,
    EndOfData,
    GCResult,
    Missing,
    MultipleParser,
    NarEnd,
    NarStart,
    Op,
    PathInfo,
    ProtocolError,
    StderrMessage,
    ValidPathInfo,
    build_succeeded,
)
from recnix.store.aio import READ_CHUNK
from recnix.store.offloop import DRV_TIMEOUT, OffLoopTimeout, off_loop
from recnix.store.policy import (
    BuildPlan,
    Denied,
    Limits,
    check_added_derivation,
    check_build,
    checked_path,
    opted_in_drvs,
    requested_features,
)
from recnix.store.seam import Store, closure_infos
from recnix.store.upstream import UpstreamError

T = TypeVar("T")

log = logging.getLogger("recnix.store.restricted")

# A text or flat-file add is received whole before it is forwarded (see
# add_to_store); up to this many bytes in memory, the rest in a temporary file.
SPOOL_IN_MEMORY = 1 << 22


def censor(info: PathInfo) -> PathInfo:
    """What a sandboxed client may learn about a path (as Nix's RestrictedStore)."""
    return PathInfo(
        deriver=None,
        nar_hash=info.nar_hash,
        references=list(info.references),
        registration_time=0,
        nar_size=info.nar_size,
        ultimate=False,
        sigs=[],
        ca=info.ca,
    )


async def censored_closure(
    query: Callable[[str], Awaitable[PathInfo | None]],
    roots: Iterable[str],
    known: Container[str],
    path_infos: dict[str, PathInfo],
) -> set[str]:
    """The closure of ``roots`` over references through ``query`` (a
    ``Store.query_path_info``), not entering paths in ``known``; each path's censored
    info goes into ``path_infos`` (what the fast path answers from)."""
    infos = await closure_infos(query, roots, known, where="the host store")
    for path, info in infos.items():
        path_infos[path] = censor(info)
    return set(infos)


class SessionState(Protocol):
    """What the restricted store reads and changes of its session
    (recnix.daemon.session.Session)."""

    sid: str
    drv_path: str
    readonly: bool
    depth: int
    limits: Limits
    allowed: set[str]
    realisations: set[str]
    path_infos: dict[str, PathInfo]
    builds: int
    added_bytes: int
    sound_drvs: set[str]
    drv_cache: dict[str, Derivation | None]

    @property
    def ancestry(self) -> set[str]: ...

    async def allow(self, paths: Iterable[str], event: str) -> None:
        """Root, materialise and allow ``paths``, which the restricted store has kept
        (``Store.keep``)."""
        ...

    def note_build_request(self, drv_paths: Iterable[str]) -> None: ...

    def journal_change(self, **change: Any) -> None: ...

    def audit(self, event: str, **fields: Any) -> None: ...


class Client(Protocol):
    """The in-sandbox client of one connection, as the restricted store needs it."""

    minor: int
    pid: int

    def stream(self) -> AsyncIterator[bytes]:
        """The current request's trailing data."""
        ...

    async def log(self, msg: StderrMessage) -> None:
        """Pass a build log message on to the client."""
        ...


@dataclass
class NarReply:
    """An op's reply followed by a NAR (NarFromPath): chunks made by blocking reads."""

    chunks: Iterator[bytes]


class _Aborted:
    """Holds why a client's stream was cut short (the upstream request is ended cleanly)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None


class RestrictedStore:
    """One client connection's restricted view of ``store`` (see the module docstring)."""

    def __init__(self, store: Store, session: SessionState, client: Client) -> None:
        self.store = store
        self.session = session
        self.client = client
        # output maps of derivations this connection built (a nix-build asks for the
        # map right after the build; the outputs of a built derivation do not change)
        self._output_maps: dict[str, dict[str, str | None]] = {}

    # -- dispatch

    def serve(self, op: Op, args: dict) -> Any:
        """The reply value of ``op`` (or an awaitable of it); raises Denied."""
        name = METHODS.get(op)
        if name is None:
            raise Denied(f"operation {op.name} is not allowed in recursive Nix (recnix)")
        return getattr(self, name)(args)

    def refused(self, op: Op | str, reason: str) -> None:
        """Audit and log a refusal."""
        name = op.name if isinstance(op, Op) else op
        self.session.audit("refused", op=name, reason=reason)
        log.info("session %s: refused %s: %s", self.session.sid, name, reason)

    # -- helpers

    def _require_allowed(self, path: str, doing: str) -> str:
        path = checked_path(path)
        if path not in self.session.allowed:
            raise Denied(
                f"cannot {doing} '{path}' in recursive Nix: it is neither an input of "
                f"{self.session.drv_path} nor something this build added or built"
            )
        return path

    def _require_writable(self, what: str) -> None:
        if self.session.readonly:
            raise Denied(
                f"{what} is not allowed: this build uses recnix-readonly (queries over its "
                "inputs only); require the 'recnix' feature to add or build"
            )

    def _read(self, drv_path: str) -> Derivation | None:
        cache = self.session.drv_cache
        if drv_path not in cache:
            drv = self.store.read_derivation(drv_path)
            if drv is None:
                return None  # not cached: it may be added later
            cache[drv_path] = drv
        return cache[drv_path]

    # -- queries

    def set_options(self, args: dict) -> None:
        return None  # the client's options are ignored: recnix sends its own upstream

    def is_valid_path(self, args: dict) -> bool:
        path = args["path"]
        # allowed paths were validated when allowed; any other is checked (and refused if
        # malformed) before it is answered invalid
        return path in self.session.allowed or checked_path(path) in self.session.allowed

    def known_path_info(self, path: str) -> PathInfo | None:
        """QueryPathInfo's answer for ``path`` when it needs no I/O: ``path`` is allowed
        and its censored info known (``SessionState.path_infos``); else None (ask
        ``query_path_info``). The connection's fast path, which then sends the reply
        it encoded for this very PathInfo object."""
        if path in self.session.allowed:
            return self.session.path_infos.get(path)
        return None

    def query_path_info(self, args: dict) -> PathInfo | None | Awaitable[PathInfo | None]:
        path = args["path"]
        s = self.session
        if path in s.allowed:  # allowed paths were validated when allowed
            info = s.path_infos.get(path)
            if info is not None:
                return info
            return self._query_path_info_upstream(path)
        path = checked_path(path)
        if self.client.minor < 17:
            raise Denied(f"path '{path}' is not valid")
        return None

    async def _query_path_info_upstream(self, path: str) -> PathInfo | None:
        upstream_info = await self.store.query_path_info(path)
        if upstream_info is None and self.client.minor < 17:
            raise Denied(f"path '{path}' is not valid")
        info = censor(upstream_info) if upstream_info else None
        if info is not None:
            self.session.path_infos[path] = info
        return info

    def query_valid_paths(self, args: dict) -> list[str]:
        paths = [checked_path(p) for p in args["paths"]]
        return [p for p in paths if p in self.session.allowed]

    def query_all_valid_paths(self, args: dict) -> list[str]:
        return sorted(self.session.allowed)

    async def _info(self, path: str) -> PathInfo:
        info = await self.store.query_path_info(path)
        if info is None:
            raise Denied(f"path '{path}' is not valid")
        return info

    async def query_path_hash(self, args: dict) -> str:
        path = self._require_allowed(args["path"], "query")
        return (await self._info(path)).nar_hash

    async def query_references(self, args: dict) -> list[str]:
        path = self._require_allowed(args["path"], "query")
        return list((await self._info(path)).references)

    def query_deriver(self, args: dict) -> None:
        checked_path(args["path"])
        return None

    def _no_paths(self, args: dict) -> list[str]:
        if "path" in args:
            checked_path(args["path"])
        return []

    query_referrers = _no_paths
    query_valid_derivers = _no_paths
    query_substitutable_paths = _no_paths

    def has_substitutes(self, args: dict) -> bool:
        checked_path(args["path"])
        return False

    def query_substitutable_path_info(self, args: dict) -> None:
        checked_path(args["path"])
        return None

    def query_substitutable_path_infos(self, args: dict) -> dict:
        return {}

    def query_path_from_hash_part(self, args: dict) -> None:
        raise Denied("queryPathFromHashPart is not allowed in recursive Nix")

    async def query_derivation_outputs(self, args: dict) -> list[str]:
        drv = self._require_allowed(args["path"], "query the outputs of")
        return await self.store.query_derivation_outputs(drv)

    async def query_derivation_output_names(self, args: dict) -> list[str]:
        drv = self._require_allowed(args["path"], "query the outputs of")
        return await self.store.query_derivation_output_names(drv)

    def query_derivation_output_map(
        self, args: dict
    ) -> dict[str, str | None] | Awaitable[dict[str, str | None]]:
        drv = self._require_allowed(args["drv_path"], "query the outputs of")
        known = self._output_maps.get(drv)
        if known is not None:
            return dict(known)
        return self.store.query_derivation_output_map(drv)

    async def query_missing(self, args: dict) -> Missing:
        s = self.session
        allowed: list[DerivedPath] = []
        unknown: list[str] = []
        for t in args["targets"]:
            path = checked_path(t.path)
            ok = path in s.allowed
            if ok and t.is_built:
                try:  # a derivation the build may not build is as good as unknown
                    self._plan([path])
                except Denied:
                    ok = False
            (allowed if ok else unknown).append(t if ok else path)
        if not allowed:
            return Missing(unknown=unknown)
        up = await self.store.query_missing(allowed)
        return Missing(
            will_build=up.will_build,
            will_substitute=up.will_substitute,
            unknown=sorted(set(up.unknown) | set(unknown)),
            download_size=up.download_size,
            nar_size=up.nar_size,
        )

    async def query_realisation(self, args: dict) -> Any:
        rid = args.get("id")
        if rid is not None and rid in self.session.realisations:
            return await self.store.query_realisation(rid)
        return []

    def nar_from_path(self, args: dict) -> NarReply:
        path = self._require_allowed(args["path"], "dump")
        return NarReply(self.store.dump(path))

    # -- inert GC and maintenance ops (as Nix's RestrictedStore)

    def ensure_path(self, args: dict) -> int:
        self._require_allowed(args["path"], "substitute")
        return 1

    def add_temp_root(self, args: dict) -> int:
        checked_path(args["path"])
        return 1

    def add_indirect_root(self, args: dict) -> int:
        return 1

    def sync_with_gc(self, args: dict) -> int:
        return 1

    def optimise_store(self, args: dict) -> int:
        return 1

    def find_roots(self, args: dict) -> dict:
        return {}

    def collect_garbage(self, args: dict) -> GCResult:
        self.refused(Op.COLLECT_GARBAGE, "garbage collection is inert in recursive Nix")
        return GCResult()

    def verify_store(self, args: dict) -> int:
        if args["repair"]:
            raise Denied("repairing the store is not allowed in recursive Nix")
        return 0

    # -- adds

    def _check_references(self, refs: Iterable[str], own: str | None = None) -> list[str]:
        refs = [checked_path(r) for r in refs]
        for ref in refs:
            if ref != own and ref not in self.session.allowed:
                raise Denied(
                    f"cannot add a path referring to '{ref}': it is neither an input of "
                    f"{self.session.drv_path} nor something this build added or built"
                )
        return refs

    def _count_bytes(self, n: int, pending: list[int]) -> None:
        """Count ``n`` more bytes of the add in progress (``pending[0]``) against the limit;
        only a completed add is charged (see _charge)."""
        s = self.session
        pending[0] += n
        limit = s.limits.max_added_bytes
        if limit and s.added_bytes + pending[0] > limit:
            raise Denied(
                f"this build would add more than {limit} bytes through recnix "
                "(policy.max-added-bytes); raise the limit in the recnix configuration"
            )

    def _check_added(self, paths: Iterable[str], extra: Iterable[str] = ()) -> None:
        """Rule 3 on what an add just put in the store (before the build may see it)."""
        allowed = self.session.allowed
        known = set(extra)
        for path in paths:
            if path.endswith(".drv"):
                drv = self.store.read_derivation(path)
                check_added_derivation(path, drv, allowed if not known else _Union(allowed, known))
                if drv is not None:
                    self.session.drv_cache[path] = drv

    async def _allow_added(self, paths: list[str], n_bytes: int) -> None:
        if any(p.endswith(".drv") for p in paths):  # the build's text, of any size
            await self._off_loop(self._check_added, paths, what="checking the added derivation")
        self.session.added_bytes += n_bytes
        await self._allow(paths, "added")

    async def _allow(self, paths: Iterable[str], event: str) -> None:
        """Keep ``paths`` (on the store, for as long as the session lives), then have the
        session root, materialise and allow them."""
        s = self.session
        new = sorted(p for p in set(paths) if p not in s.allowed)
        if new:
            await self.store.keep(new)
            await s.allow(new, event)

    async def _closure(self, roots: Iterable[str]) -> set[str]:
        """The closure of ``roots`` over references, without what the session allows
        already; their (censored) path infos are remembered for the fast path."""
        s = self.session
        return await censored_closure(self.store.query_path_info, roots, s.allowed, s.path_infos)

    async def _guarded(
        self,
        chunks: AsyncIterator[bytes],
        aborted: _Aborted,
        pending: list[int] | None,
        hasher: Any = None,
    ) -> AsyncIterator[bytes]:
        """``chunks`` for an upstream NAR stream: if the client's stream fails or the byte
        limit is hit, end the stream early so that the daemon rejects the truncated NAR
        with an error and the upstream connection stays in sync (no worker killed)."""
        try:
            async for chunk in chunks:
                if pending is not None:
                    self._count_bytes(len(chunk), pending)
                if hasher is not None:
                    hasher.update(chunk)
                yield chunk
        except (ConnectionError, ProtocolError, Denied, asyncio.IncompleteReadError) as e:
            aborted.error = e

    async def _forward_nar(self, call: Awaitable[Any], aborted: _Aborted) -> Any:
        try:
            result = await call
        except UpstreamError:
            if aborted.error is not None:
                raise aborted.error from None
            raise
        if aborted.error is not None:
            raise aborted.error
        return result

    async def _existing(self, path: str) -> PathInfo | None:
        """The host's info of ``path`` if it is valid there but not allowed here.

        Nix's daemon accepts a NAR for an already-valid path without reading it: a
        client could claim any host path by name. Such an add is allowed only if the
        NAR it sent is the path's (its hash matches): the client had the content.
        """
        if path in self.session.allowed:
            return None
        return await self.store.query_path_info(path)

    def _check_claim(self, path: str, existing: PathInfo | None, hasher: Any) -> None:
        if existing is not None and hasher.hexdigest() != _base16(existing.nar_hash):
            raise Denied(
                f"cannot add '{path}': it already exists in the host store and the NAR sent "
                "is not its content; a build may not claim host paths it does not have"
            )

    async def add_to_store(self, args: dict) -> ValidPathInfo:
        self._require_writable(f"adding '{args['name']}' to the store")
        if self.client.minor < 25:
            raise Denied("recnix needs a Nix client speaking protocol ≥ 1.25 to add paths")
        refs = self._check_references(args["references"])
        name, ca_method = args["name"], args["ca_method"]
        pending = [0]
        if ca_method.startswith("fixed:r:"):
            # A NAR: the daemon rejects it if the stream ends early, so stream it through.
            aborted = _Aborted()
            data = self._guarded(self.client.stream(), aborted, pending)
            result = await self._forward_nar(
                self.store.add_to_store(name, ca_method, refs, data), aborted
            )
        else:
            # Text and flat files: Nix's daemon takes end-of-file for the end of the
            # data, so a stream cut short (client gone, byte limit hit) would become a
            # valid truncated path. Forward only what arrived complete.
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
                async for chunk in self.client.stream():
                    self._count_bytes(len(chunk), pending)
                    spool.write(chunk)
                spool.seek(0)
                chunks = iter(lambda: spool.read(READ_CHUNK), b"")
                result = await self.store.add_to_store(name, ca_method, refs, chunks)
        await self._allow_added([result.path], pending[0])
        info = self._know(result)
        return ValidPathInfo(result.path, info)

    def _know(self, added: ValidPathInfo) -> PathInfo:
        """The censored info of a path the daemon just added, kept for QueryPathInfo."""
        return self.session.path_infos.setdefault(added.path, censor(added.info))

    async def add_text_to_store(self, args: dict) -> str:
        self._require_writable(f"adding '{args['name']}' to the store")
        refs = self._check_references(args["references"])
        pending = [0]
        self._count_bytes(len(args["text"]), pending)
        result = await self.store.add_to_store(args["name"], "text:sha256", refs, [args["text"]])
        await self._allow_added([result.path], pending[0])
        self._know(result)
        return result.path

    async def add_to_store_nar(self, args: dict) -> None:
        path = checked_path(args["path"])
        self._require_writable(f"adding '{path}' to the store")
        refs = self._check_references(args["references"], own=path)
        info = ValidPathInfo(
            path,
            PathInfo(
                deriver=args["deriver"],
                nar_hash=args["nar_hash"],
                references=refs,
                registration_time=args["registration_time"],
                nar_size=args["nar_size"],
                sigs=list(args["sigs"]),
                ca=args["ca"],
            ),
        )
        pending = [0]
        aborted = _Aborted()
        existing = await self._existing(path)
        hasher = hashlib.sha256()
        data = self._guarded(self.client.stream(), aborted, pending, hasher)
        await self._forward_nar(self.store.add_to_store_nar(_upstream_info(info), data), aborted)
        self._check_claim(path, existing, hasher)
        await self._allow_added([path], pending[0])

    async def add_multiple_to_store(self, args: dict) -> None:
        self._require_writable("adding paths to the store")
        events = _multiple_events(self.client.stream())
        added: list[str] = []
        n_bytes = [0]
        async for ev in events:
            if not isinstance(ev, NarStart):
                raise ProtocolError(f"unexpected {type(ev).__name__} in AddMultipleToStore")
            path = checked_path(ev.info.path)
            refs = ev.info.info.references
            for ref in refs:  # earlier entries of the same request count as allowed
                if ref != path and ref not in added:
                    self._check_references([ref])
            self._count_bytes(ev.info.info.nar_size, n_bytes)

            async def nar(events: AsyncIterator = events) -> AsyncIterator[bytes]:
                async for e in events:
                    if isinstance(e, Data):
                        yield e.data
                    elif isinstance(e, NarEnd):
                        return
                    else:
                        raise ProtocolError(f"unexpected {type(e).__name__} inside a NAR")

            # Nix 2.8's daemon desynchronises on already-valid paths inside
            # AddMultipleToStore (§3.5 item 6): send each path on its own.
            aborted = _Aborted()
            existing = None if path in added else await self._existing(path)
            hasher = hashlib.sha256()
            await self._forward_nar(
                self.store.add_to_store_nar(
                    _upstream_info(ev.info), self._guarded(nar(), aborted, None, hasher)
                ),
                aborted,
            )
            self._check_claim(path, existing, hasher)
            if path.endswith(".drv"):
                await self._off_loop(
                    self._check_added, [path], added, what="checking the added derivation"
                )
            added.append(path)
        await self._allow_added(added, n_bytes[0])

    # -- builds

    def _plan(self, drv_paths: list[str]) -> BuildPlan:
        s = self.session
        return check_build(
            drv_paths,
            s.allowed,
            self._read,
            self.store.path_exists,
            s.limits.allow_fixed_output,
            s.limits.existing_fixed_outputs,
            sound=s.sound_drvs,
        )

    async def _off_loop(self, fn: Callable[..., T], *args: Any, what: str) -> T:
        """``fn(*args)`` off the event loop, bounded by offloop.DRV_TIMEOUT: it reads and
        checks .drv texts and derivation graphs the build chose (Denied on time-out)."""
        try:
            return await off_loop(fn, *args, timeout=DRV_TIMEOUT, what=what)
        except OffLoopTimeout as e:
            raise Denied(f"{e}; the derivation graph is too large for recursive Nix") from None

    def _check_build(self, targets: list[DerivedPath], build_mode: int) -> BuildPlan:
        """Refuse a build the policy forbids; return what it may build (reads .drv files:
        runs off the event loop)."""
        s = self.session
        self._require_writable("building")
        if build_mode != 0:
            raise Denied("repair and check builds are not allowed in recursive Nix")
        for t in targets:
            path = self._require_allowed(t.path, "build")
            if path in s.ancestry:
                raise Denied(
                    f"cannot build '{path}' from inside its own build (it would wait forever "
                    "on its own output locks)"
                )
        self._check_nesting([t.path for t in targets])
        if s.limits.max_builds and s.builds + 1 > s.limits.max_builds:
            raise Denied(
                f"this build already made {s.builds} nested build requests "
                "(policy.max-builds-per-session); raise the limit in the recnix configuration"
            )
        return self._plan([t.path for t in targets if t.is_built])

    def _check_nesting(self, drv_paths: list[str]) -> None:
        """Refuse to start a nested recnix build deeper than policy.max-depth."""
        s = self.session
        if not s.limits.max_depth or s.depth < s.limits.max_depth:
            return
        for drv_path in drv_paths:
            if not drv_path.endswith(".drv"):
                continue
            if requested_features(drv_path) & OPT_IN_FEATURES:
                raise Denied(
                    f"cannot build '{drv_path}': it requires recnix and would be recursive "
                    f"build level {s.depth + 1}, above policy.max-depth = {s.limits.max_depth}; "
                    "raise it in the recnix configuration"
                )

    async def _outputs_of(self, targets: list[DerivedPath]) -> set[str]:
        paths: set[str] = set()
        for t in targets:
            if not t.is_built:
                paths.add(t.path)
                continue
            outputs = await self.store.query_derivation_output_map(t.path)
            if outputs and all(outputs.values()):
                self._output_maps[t.path] = dict(outputs)
            wanted = set(t.outputs or ["*"])
            for name, out in outputs.items():
                if out and ("*" in wanted or name in wanted):
                    paths.add(out)
        return paths

    async def _build(self, op: Op, args: dict) -> Any:
        s = self.session
        targets: list[DerivedPath] = args["paths"]
        plan = await self._off_loop(
            self._check_build, targets, args.get("build_mode", 0), what="checking the build"
        )
        s.note_build_request(t.path for t in targets)
        names = [t.path + ("!" + ",".join(t.outputs) if t.outputs else "") for t in targets]
        for h in plan.handouts:
            s.audit("existing-fixed-output", derivation=h.drv_path, outputs=list(h.outputs))
        s.audit("build-started", targets=names)
        # A recnix build among them needs the pre-build hook to get its session.
        hooks = bool(opted_in_drvs(plan.runs))
        on_log = self.client.log if s.limits.forward_build_logs else None
        try:
            if op is Op.BUILD_PATHS_WITH_RESULTS:
                value = await self.store.build_paths_with_results(
                    targets, 0, on_log=on_log, hooks=hooks
                )
            else:
                value = await self.store.build_paths(targets, 0, on_log=on_log, hooks=hooks)
        except UpstreamError as e:
            s.audit("build-finished", targets=names, ok=False, error=str(e))
            raise
        ok_targets = targets
        if op is Op.BUILD_PATHS_WITH_RESULTS:
            ok_targets = [r.path for r in value if build_succeeded(r.result.status)]
            for r in value:
                s.realisations.update(r.result.built_outputs)
            s.journal_change(realisations=s.realisations)
        outputs = await self._outputs_of(ok_targets)
        await self._allow(await self._closure(outputs), "built")
        s.audit(
            "build-finished",
            targets=names,
            ok=len(ok_targets) == len(targets),
            outputs=sorted(outputs),
        )
        return value

    async def build_paths(self, args: dict) -> int:
        await self._build(Op.BUILD_PATHS, args)
        return 1

    async def build_paths_with_results(self, args: dict) -> Any:
        return await self._build(Op.BUILD_PATHS_WITH_RESULTS, args)


class _Union:
    """Membership in either of two sets, without copying them."""

    def __init__(self, a: set[str], b: set[str]) -> None:
        self.a, self.b = a, b

    def __contains__(self, x: object) -> bool:
        return x in self.a or x in self.b

    def __iter__(self) -> Iterator[str]:
        yield from self.a
        yield from self.b - self.a

    def __len__(self) -> int:
        return len(self.a | self.b)


def _base16(nar_hash: str) -> str:
    """A PathInfo's narHash as base 16 ("sha256:<nix32>" or bare base 16 as Nix 2.8 sends)."""
    algo, _, digest = nar_hash.rpartition(":")
    if algo not in ("", "sha256"):
        return nar_hash
    if len(digest) == 52:
        return nix32_to_base16(digest)
    return digest.lower()


def _upstream_info(info: ValidPathInfo) -> ValidPathInfo:
    """A client's path info as recnix forwards it (never ``ultimate``)."""
    i = info.info
    return ValidPathInfo(
        info.path,
        PathInfo(
            deriver=i.deriver,
            nar_hash=i.nar_hash,
            references=list(i.references),
            registration_time=i.registration_time,
            nar_size=i.nar_size,
            ultimate=False,
            sigs=list(i.sigs),
            ca=i.ca,
        ),
    )


async def _multiple_events(stream: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """AddMultipleToStore's entries as MultipleParser events."""
    parser = MultipleParser()
    async for chunk in stream:
        parser.receive_data(chunk)
        while (ev := parser.next_event()) is not NEED_DATA:
            yield ev
    parser.receive_data(b"")
    while True:
        ev = parser.next_event()
        if isinstance(ev, EndOfData):
            return
        if ev is NEED_DATA:
            raise ProtocolError("AddMultipleToStore stream ended early")
        yield ev


METHODS: dict[Op, str] = {
    op: op.name.lower() for op in Op if callable(getattr(RestrictedStore, op.name.lower(), None))
}
"""The method serving each op (named after it)."""

SERVED_OPS: frozenset[Op] = frozenset(METHODS)
"""Ops the restricted store serves; every other op (BuildDerivation, AddSignatures,
RegisterDrvOutput, AddBuildLog, AddPermRoot, ExportPath, ImportPaths, ...) is refused."""

SYNC_OPS: frozenset[Op] = frozenset(
    op
    for op in SERVED_OPS
    if not inspect.iscoroutinefunction(getattr(RestrictedStore, op.name.lower()))
)
"""Ops whose method may answer at once (no I/O, no stream): the connection's fast
path runs them straight from data_received (see ConnectionHandler.on_data)."""
