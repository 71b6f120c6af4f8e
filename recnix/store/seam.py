"""What a session needs from Nix, as one typed interface.

``Store`` is implemented by the upstream client (:class:`recnix.store.upstream.Upstream`,
one nix-daemon connection), by the per-connection pair of upstream connections a
session hands out (``recnix.daemon.session.ConnectionUpstreams``), by the in-memory fake
the unit tests use, and, over any of them, by
:class:`recnix.store.restricted.RestrictedStore`'s view of the same operations. The
restricted view is policy; a ``Store`` here is only the mechanism.
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Container,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Protocol

from recnix.formats.derivation import Derivation
from recnix.protocol import (
    DerivedPath,
    KeyedBuildResult,
    Missing,
    PathInfo,
    StderrMessage,
    ValidPathInfo,
)

LogCallback = Callable[[StderrMessage], Awaitable[None] | None]
Data = AsyncIterable[bytes] | Iterable[bytes]


class StoreError(Exception):
    """A store operation failed: the store's error (its message is the text), a lost
    connection (recnix.store.upstream), or a path that is not valid."""


class InvalidPathError(StoreError):
    """A path met on the way (a closure's reference, a path asked for) is not valid."""

    def __init__(self, path: str, where: str = "the store") -> None:
        super().__init__(f"path '{path}' is not valid in {where}")
        self.path = path


async def closure_infos(
    query: Callable[[str], Awaitable[PathInfo | None]],
    roots: Iterable[str],
    known: Container[str] = frozenset(),
    references: bool = True,
    where: str = "the store",
) -> dict[str, PathInfo]:
    """The path infos of ``roots`` and (``references``) of their closure over
    references, asked one path at a time of ``query`` (a ``Store.query_path_info``);
    the walk does not enter paths in ``known``. InvalidPathError (naming ``where``)
    for a path that is not valid."""
    infos: dict[str, PathInfo] = {}
    todo = [p for p in roots if p not in known]
    while todo:
        path = todo.pop()
        if path in infos:
            continue
        info = await query(path)
        if info is None:
            raise InvalidPathError(path, where)
        infos[path] = info
        if references:
            todo.extend(r for r in info.references if r not in infos and r not in known)
    return infos


def topo_order(infos: Mapping[str, PathInfo]) -> list[str]:
    """The paths of ``infos``, each after the references it has among them (the order to
    add a closure to a store in)."""
    order: list[str] = []
    done: set[str] = set()
    for root in sorted(infos):
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            path, expanded = stack.pop()
            if path in done:
                continue
            if expanded:
                done.add(path)
                order.append(path)
                continue
            stack.append((path, True))
            for ref in infos[path].references:
                if ref in infos and ref not in done and ref != path:
                    stack.append((ref, False))
    return order


class Store(Protocol):
    """The store operations a restricted session forwards (all of the local store)."""

    async def query_path_info(self, path: str) -> PathInfo | None:
        """The path's info, None if it is not valid."""
        ...

    async def query_valid_paths(self, paths: Iterable[str], substitute: bool = False) -> list[str]:
        """The valid ones among ``paths``."""
        ...

    async def query_derivation_outputs(self, drv_path: str) -> list[str]:
        """Output paths of a derivation (QueryDerivationOutputs)."""
        ...

    async def query_derivation_output_names(self, drv_path: str) -> list[str]:
        """Output names of a derivation."""
        ...

    async def query_derivation_output_map(self, drv_path: str) -> dict[str, str | None]:
        """Output name -> path (None if not known yet)."""
        ...

    async def query_missing(self, targets: list[DerivedPath]) -> Missing:
        """What building ``targets`` would build, substitute, or cannot know."""
        ...

    async def query_realisation(self, rid: str) -> Any:
        """The realisation(s) of a DrvOutput id, as the op's reply value."""
        ...

    async def add_to_store(
        self, name: str, ca_method: str, references: Iterable[str], data: Data
    ) -> ValidPathInfo:
        """Add content (``ca_method`` "text:sha256", "fixed:[r:]<algo>")."""
        ...

    async def add_to_store_nar(self, info: ValidPathInfo, data: Data) -> None:
        """Add a path from its NAR and info."""
        ...

    async def keep(self, paths: Iterable[str]) -> None:
        """Keep ``paths`` from Nix's garbage collector for as long as this store's owner
        lives (temp roots: a session's on its keeper connection)."""
        ...

    async def build_paths(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: LogCallback | None = None,
        hooks: bool = True,
    ) -> None:
        """Build ``targets`` (``hooks``: nix.conf's build hooks must run for them)."""
        ...

    async def build_paths_with_results(
        self,
        targets: list[DerivedPath],
        build_mode: int = 0,
        on_log: LogCallback | None = None,
        hooks: bool = True,
    ) -> list[KeyedBuildResult]:
        """Build ``targets``, one result each."""
        ...

    def read_derivation(self, drv_path: str) -> Derivation | None:
        """The parsed text of a store path named ``*.drv`` (None: absent or not a derivation)."""
        ...

    def path_exists(self, path: str) -> bool:
        """Whether ``path`` exists in the store's directory (cheap validity test)."""
        ...

    def dump(self, path: str) -> Iterator[bytes]:
        """The NAR serialisation of ``path``, chunk by chunk (blocking reads)."""
        ...
