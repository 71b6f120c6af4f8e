"""Post-build fix-up of output references (DESIGN step 5, NI §6.2).

Nix scans a build's outputs only for references to paths *it* knows (§3.6), so references to
paths that reached the sandbox through recnix are dropped. After registration (post-build hook)
recnix scans every output for the hash parts of the session's paths, re-checks the
derivation's reference constraints, adds the missing references with
`nix-store --register-validity --reregister --hash-given` and re-signs. Content-addressed
outer derivations cannot be fixed up (their path depends on their references, §6.5): such an
output referencing a session path fails the finalisation. A failed finalisation is the
caller's to undo: the outputs must not stay valid (``recnix.store.invalidate``).

It runs on the service's event loop: the store is read over the worker protocol
(:class:`DaemonQueries`), and only what blocks (reading the outputs the build wrote,
the `nix-store` that re-registers, signing) runs in the default executor.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

from recnix.formats.derivation import Derivation, DerivationError, read_derivation
from recnix.formats.storepath import (
    STORE_PREFIX,
    InvalidStorePath,
    hash_part,
    validate_store_path,
)
from recnix.protocol.nar import scan_for_hashes
from recnix.store.seam import InvalidPathError, StoreError, closure_infos
from recnix.store.upstream import Upstream
from recnix.store.upstreampool import UpstreamPool

T = TypeVar("T")

NIX_COMMAND = ["--extra-experimental-features", "nix-command"]
REGISTER_COMMAND = ["nix-store", "--register-validity", "--reregister", "--hash-given"]
REGISTER_TIMEOUT = 600.0  # seconds for one re-registration (it waits for the store's locks)
QUERY_TIMEOUT = 120.0  # seconds for one query (a path, or a closure) during finalisation
CA_OUTPUT_KINDS = ("caFixed", "caFloating", "impure")


class FinaliseError(Exception):
    """Finalising a build's outputs failed; the message says which output and why."""


@dataclass
class FinaliseReport:
    """Outputs of the derivation (name -> path) and the references added to each."""

    outputs: dict[str, str]
    added_refs: dict[str, set[str]] = field(default_factory=dict)


def local_store_env(nix_env: Mapping[str, str]) -> dict[str, str]:
    """`nix_env` with direct local-store access, as re-registering needs.

    ``NIX_REMOTE=local``, not merely unset: since Lix 2.94 the default store
    (``auto``) is the daemon whenever its socket exists, even for root, and the
    daemon refuses `--register-validity` ("you don't have sufficient rights").
    """
    from recnix.store.storeenv import local_env

    env = local_env(nix_env)
    env.setdefault("NIX_PAGER", "cat")
    return env


def _run(argv: list[str], env: Mapping[str, str], stdin: str | None = None) -> str:
    """Run a Nix CLI command; its stdout, or FinaliseError with its stderr."""
    try:
        result = subprocess.run(
            argv,
            env=dict(env),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as e:
        raise FinaliseError(f"cannot run {argv[0]}: {e}") from None
    _check_exit(argv, result.returncode, result.stderr)
    return result.stdout


def _check_exit(argv: list[str], returncode: int, stderr: str) -> None:
    if returncode != 0:
        raise FinaliseError(f"`{' '.join(argv)}` failed (exit {returncode}): {stderr.strip()}")


class Registrar:
    """A `nix-store --register-validity --reregister --hash-given` process started ahead
    of time: it then waits for its input, and its start-up (about 30 ms of dynamic
    linking and opening the store) is off the post-build hook's critical path.

    Use once: :meth:`register` the records, or :meth:`close` it.
    """

    def __init__(self, nix_env: Mapping[str, str]) -> None:
        try:
            self.process = subprocess.Popen(
                REGISTER_COMMAND,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=local_store_env(nix_env),
            )
        except OSError as e:
            raise FinaliseError(f"cannot run {REGISTER_COMMAND[0]}: {e}") from None

    def register(self, records: Iterable[list[str]]) -> None:
        """Re-register paths: each record is the lines `--register-validity` reads."""
        data = "".join(line + "\n" for record in records for line in record).encode()
        try:
            _, err = self.process.communicate(data, timeout=REGISTER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
            raise FinaliseError(
                f"`{' '.join(REGISTER_COMMAND)}` did not finish within {REGISTER_TIMEOUT:.0f} s"
            ) from None
        except (OSError, ValueError) as e:  # it died early, or was already used
            self._kill()
            raise FinaliseError(f"`{' '.join(REGISTER_COMMAND)}` failed: {e}") from None
        _check_exit(REGISTER_COMMAND, self.process.returncode, err.decode(errors="replace"))

    def close(self) -> None:
        """Let the process go without registering anything (it reads an empty input)."""
        try:
            self.process.communicate(b"", timeout=60)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self._kill()

    def _kill(self) -> None:
        self.process.kill()
        self.process.wait()


class RegisteredInfo(NamedTuple):
    """What re-registering a valid path keeps of it."""

    nar_hash: str  # as `nix-store --register-validity --hash-given` reads it
    nar_size: int
    references: frozenset[str]
    deriver: str  # "" if unknown


def _read_drv(drv_path: str) -> Derivation:
    try:
        return read_derivation(drv_path)
    except (OSError, DerivationError) as e:
        raise FinaliseError(f"cannot read derivation {drv_path}: {e}") from None


async def outputs_of(
    drv_path: str, queries: StoreQueries, drv: Derivation | None = None
) -> dict[str, str]:
    """Output name -> output path of a built derivation (``drv``: its parsed .drv, if the
    caller has it).

    Nix 2.8.0's post-build hook gets an empty OUT_PATHS, so the outputs come from the .drv;
    outputs whose path is not in the .drv (floating CA, impure) from the store's output
    map of the derivation.
    """
    drv = drv or await asyncio.to_thread(_read_drv, drv_path)
    outputs = {name: out.path for name, out in drv.outputs.items() if out.path}
    missing = [name for name in drv.outputs if name not in outputs]
    if missing:
        known = await queries.output_map(drv_path)
        for name in missing:
            path = known.get(name)
            if not path:
                raise FinaliseError(f"cannot determine output {name!r} of {drv_path}")
            outputs[name] = path
    return outputs


def scan_references(output_path: str, candidates: Iterable[str]) -> set[str]:
    """Which `candidates` (store paths) have their hash part in `output_path`'s NAR."""
    by_hash: dict[str, str] = {}
    for path in candidates:
        by_hash[hash_part(path)] = path
    if not by_hash:
        return set()
    return {by_hash[h] for h in scan_for_hashes(output_path, by_hash)}


def _scan_output(drv_path: str, name: str, output_path: str, candidates: set[str]) -> set[str]:
    """The ``candidates`` output ``name`` refers to (blocking: reads what the build wrote)."""
    if not os.path.lexists(output_path):
        raise FinaliseError(f"output {name!r} of {drv_path} ({output_path}) does not exist")
    try:
        return scan_references(output_path, candidates)
    except (OSError, ValueError, InvalidStorePath) as e:
        raise FinaliseError(f"cannot scan output {name!r} ({output_path}): {e}") from None


class StoreQueries(Protocol):
    """How finalisation reads the store: afresh, with no cache from before a
    re-registration (:class:`DaemonQueries`; an in-memory store in the unit tests)."""

    async def path_info(self, path: str) -> RegisteredInfo:
        """The registration of the valid path ``path`` (FinaliseError if it is not valid)."""
        ...

    async def closure(self, paths: Iterable[str]) -> dict[str, int]:
        """The closure of ``paths``, each path with its NAR size."""
        ...

    async def output_map(self, drv_path: str) -> dict[str, str | None]:
        """Output name -> path of a derivation, as the store knows them."""
        ...


class DaemonQueries:
    """StoreQueries over the worker protocol, each on a fresh connection from ``pool``:
    a fresh daemon worker, whose cache cannot predate a re-registration."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    async def _ask(self, what: str, query: Callable[[Upstream], Awaitable[T]]) -> T:
        try:
            upstream = await self.pool.fresh()
            try:
                return await asyncio.wait_for(query(upstream), QUERY_TIMEOUT)
            finally:
                await upstream.close()
        except InvalidPathError as e:
            raise FinaliseError(str(e)) from None
        except TimeoutError:
            raise FinaliseError(
                f"the nix-daemon did not answer {what} within {QUERY_TIMEOUT:.0f} s"
            ) from None
        except (StoreError, OSError) as e:
            raise FinaliseError(f"cannot query {what}: {e}") from None

    async def path_info(self, path: str) -> RegisteredInfo:
        infos = await self._ask(
            f"the path info of {path}",
            lambda up: closure_infos(up.query_path_info, [path], references=False),
        )
        info = infos[path]
        return RegisteredInfo(
            f"sha256:{info.nar_hash}",
            info.nar_size,
            frozenset(info.references),
            info.deriver or "",
        )

    async def closure(self, paths: Iterable[str]) -> dict[str, int]:
        roots = list(paths)
        if not roots:
            return {}
        infos = await self._ask(
            f"the closure of {', '.join(roots)}",
            lambda up: closure_infos(up.query_path_info, roots),
        )
        return {path: info.nar_size for path, info in infos.items()}

    async def output_map(self, drv_path: str) -> dict[str, str | None]:
        return await self._ask(
            f"the outputs of {drv_path}", lambda up: up.query_derivation_output_map(drv_path)
        )


def registration_record(
    output_path: str, info: RegisteredInfo, new_refs: Iterable[str]
) -> list[str]:
    """The `--register-validity --hash-given` lines that give ``output_path`` (registered
    as ``info``) its references ∪ ``new_refs``, deriver and hash kept."""
    new = set(new_refs)
    for ref in new:
        validate_store_path(ref)
    deriver = info.deriver if info.deriver.startswith(STORE_PREFIX) else ""  # "unknown-deriver"
    refs = sorted(info.references | new)
    return [output_path, info.nar_hash, str(info.nar_size), deriver, str(len(refs)), *refs]


async def verify_references(output_path: str, record: list[str], queries: StoreQueries) -> None:
    """FinaliseError unless ``output_path`` now has every reference ``record`` gave it."""
    missing = set(record[5:]) - (await queries.path_info(output_path)).references
    if missing:
        raise FinaliseError(
            f"re-registering {output_path} did not add references {sorted(missing)}"
        )


def _reference_spec(drv: Derivation, outputs: Mapping[str, str], items: list[str]) -> set[str]:
    """Nix's reference specifiers: store paths, or names of this derivation's outputs."""
    spec = set()
    for item in items:
        if item in outputs:
            spec.add(outputs[item])
            continue
        try:
            spec.add(validate_store_path(item))
        except InvalidStorePath:
            raise FinaliseError(
                f"derivation {drv.name!r} contains an illegal reference specifier {item!r}"
            ) from None
    return spec


def check_output_constraints(
    drv: Derivation,
    output_name: str,
    outputs: Mapping[str, str],
    refs: set[str],
    closure: set[str],
    new_paths: set[str] | None = None,
) -> None:
    """Re-check allowed/disallowed references/requisites of one output.

    `refs`: the output's references (old ∪ new); `closure`: its closure with them.
    Only paths in `new_paths` (what the fix-up adds, directly or through the closure) are
    reported, since Nix already accepted the rest; None checks everything.
    """
    output_path = outputs[output_name]
    checks = drv.output_checks(output_name)
    rules = [
        ("allowedReferences", checks.allowed_references, refs, True),
        ("disallowedReferences", checks.disallowed_references, refs, False),
        ("allowedRequisites", checks.allowed_requisites, closure, True),
        ("disallowedRequisites", checks.disallowed_requisites, closure, False),
    ]
    for attr, items, used, allowed in rules:
        if items is None:
            continue
        spec = _reference_spec(drv, outputs, items)
        bad = sorted(
            p
            for p in used - {output_path}
            if (p not in spec if allowed else p in spec) and (new_paths is None or p in new_paths)
        )
        if bad:
            raise FinaliseError(
                f"output {output_name!r} ({output_path}) of {drv.name or 'derivation'} violates "
                f"{attr}: it refers to {', '.join(bad)} (a path added through recnix)"
            )


def ensure_not_ca_referencing(
    drv: Derivation, drv_path: str, output_name: str, found: set[str]
) -> None:
    """Fail when a content-addressed output references session paths (NI §6.5)."""
    kind = drv.outputs[output_name].kind
    if kind in CA_OUTPUT_KINDS and found:
        what = {
            "caFixed": "fixed-output",
            "caFloating": "floating content-addressed",
            "impure": "impure",
        }[kind]
        raise FinaliseError(
            f"output {output_name!r} of {what} derivation {drv_path} refers to "
            f"{', '.join(sorted(found))}, which came from a recursive Nix call; the store path "
            f"of a content-addressed output is computed from its references, so they cannot "
            f"be added after the build. Use recursive results only at build time in such "
            f"derivations, or make the derivation input-addressed."
        )


def resign(paths: Iterable[str], key_files: Iterable[str], nix_env: Mapping[str, str]) -> None:
    """Sign `paths` with every secret key file (re-registration dropped all signatures;
    blocking: runs `nix store sign`)."""
    paths = list(paths)
    if not paths:
        return
    env = local_store_env(nix_env)
    for key_file in key_files:
        _run(["nix", *NIX_COMMAND, "store", "sign", "--key-file", key_file, *paths], env)


async def finalise_outputs(
    drv_path: str,
    session_paths: set[str],
    key_files: list[str],
    nix_env: Mapping[str, str],
    queries: StoreQueries,
    registrar: Registrar | None = None,
    check: bool = True,
    drv: Derivation | None = None,
) -> FinaliseReport:
    """Add the references Nix missed to every output of `drv_path` (see module docstring).

    ``queries``: how to read the store (see StoreQueries); ``registrar``: one started
    ahead of time, used or closed here (default: a new one when there is something to
    register). All outputs are re-registered at once. ``check=False``: skip
    allowedReferences & co. (only to complete the closure of outputs that failed them
    but cannot be invalidated). ``drv``: the parsed .drv, if the caller has it (else it
    is read here).
    """
    try:
        drv = drv or await asyncio.to_thread(_read_drv, drv_path)
        report, pending = await _plan_fix_ups(drv_path, drv, session_paths, queries, check)
        if pending:
            using, registrar = registrar or Registrar(nix_env), None
            records = [record for _, record, _ in pending.values()]
            await asyncio.to_thread(using.register, records)
    finally:
        if registrar is not None:
            await asyncio.to_thread(registrar.close)
    for name, (output_path, record, new) in pending.items():
        await verify_references(output_path, record, queries)
        report.added_refs[name] = new
    changed = [report.outputs[name] for name in report.added_refs]
    if changed and key_files:
        await asyncio.to_thread(resign, changed, key_files, nix_env)
    return report


async def _plan_fix_ups(
    drv_path: str,
    drv: Derivation,
    session_paths: set[str],
    queries: StoreQueries,
    check: bool = True,
) -> tuple[FinaliseReport, dict[str, tuple[str, list[str], set[str]]]]:
    """Scan and (``check``) check every output; the report so far and, by output name,
    the re-registrations needed: (output path, record, new references)."""
    pending: dict[str, tuple[str, list[str], set[str]]] = {}
    outputs = await outputs_of(drv_path, queries, drv)
    candidates = set(session_paths) - set(outputs.values())
    for name, output_path in sorted(outputs.items()):
        found = await asyncio.to_thread(_scan_output, drv_path, name, output_path, candidates)
        ensure_not_ca_referencing(drv, drv_path, name, found)
        if not found:
            continue
        info = await queries.path_info(output_path)
        old = set(info.references)
        new = found - old
        if not new:
            continue
        if check:
            await _check_fix_up(drv, name, outputs, old, new, queries)
        pending[name] = (output_path, registration_record(output_path, info, new), new)
    return FinaliseReport(outputs=outputs), pending


async def _check_fix_up(
    drv: Derivation,
    name: str,
    outputs: Mapping[str, str],
    old: set[str],
    new: set[str],
    queries: StoreQueries,
) -> None:
    """FinaliseError if output ``name`` (references ``old``) breaks a constraint of
    ``drv`` once it also refers to ``new``."""
    output_path = outputs[name]
    checks = drv.output_checks(name)
    if (
        checks.allowed_requisites is None
        and checks.disallowed_requisites is None
        and checks.max_closure_size is None
    ):
        closure, new_paths = old | new, new  # only reference checks apply
        sizes: dict[str, int] = {}
    else:
        old_closure = await queries.closure([output_path])
        new_closure = await queries.closure(sorted(new))
        sizes = {**old_closure, **new_closure}
        closure, new_paths = set(sizes), set(new_closure) - set(old_closure)
    check_output_constraints(
        drv, name, outputs, refs=old | new, closure=closure, new_paths=new_paths
    )
    if checks.max_closure_size is not None:
        size = sum(sizes.values())
        if size > checks.max_closure_size:
            raise FinaliseError(
                f"output {name!r} ({output_path}) of {drv.name or 'derivation'} violates "
                f"maxClosureSize: its closure is {size} bytes with what it refers to "
                f"through recnix ({', '.join(sorted(new))}); the limit is "
                f"{checks.max_closure_size} bytes"
            )


__all__ = [
    "DaemonQueries",
    "FinaliseError",
    "FinaliseReport",
    "check_output_constraints",
    "ensure_not_ca_referencing",
    "finalise_outputs",
    "local_store_env",
    "outputs_of",
    "Registrar",
    "RegisteredInfo",
    "registration_record",
    "resign",
    "scan_references",
    "StoreQueries",
    "verify_references",
]
