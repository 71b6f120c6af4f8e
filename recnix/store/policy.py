"""What a session may do: the restricted view's decisions, kept apart from I/O.

``Denied`` carries the message the in-sandbox client sees; it always names the
path or operation and says what to do about it.

The rule (docs/security.md, "The one rule"), with *allowed* = the closure of
the build's inputs ∪ what its session added ∪ the outputs of what it was
permitted to build:

1. A derivation may be built, or its outputs handed out, only if every
   derivation in its closure under inputDrvs — read from the ``.drv`` *text*,
   never from the store's reference list (a source path named ``*.drv`` has
   none) — is itself allowed and readable, and has all its inputSrcs in
   *allowed* (:func:`check_build`).
2. Of that closure, the derivations Nix would run (outputs not all valid, and
   not below a derivation whose outputs are all valid) may not be
   fixed-output unless ``policy.allow-fixed-output``. A fixed-output derivation
   met with all outputs valid is handed out when
   ``policy.existing-fixed-outputs = "allow"`` (audited) and refused when
   ``"deny"``.
3. An added path whose name ends in ``.drv``, whatever the add op and its
   declared references, is parsed and refused if it is not a derivation or if
   its inputSrcs or inputDrvs name a path outside *allowed*
   (:func:`check_added_derivation`); the declared references of any add must
   be allowed (the session checks them).
4. The outer build's own ``.drv`` (and its ancestors') is never buildable.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from recnix.config.names import FEATURE, FEATURE_READONLY
from recnix.config.settings import PolicySettings
from recnix.formats.derivation import Derivation, DerivationError, read_derivation
from recnix.formats.storepath import InvalidStorePath, validate_store_path


class Denied(Exception):
    """An operation the session refuses; the message goes to the in-sandbox client."""


@dataclass(frozen=True)
class Limits:
    """Per-session limits from the ``[policy]`` table."""

    max_depth: int
    max_builds: int
    max_added_bytes: int
    allow_fixed_output: bool
    max_connections: int
    existing_fixed_outputs: str = "allow"
    forward_build_logs: bool = True

    @classmethod
    def from_policy(cls, policy: PolicySettings) -> Limits:
        """The limits of ``[policy]`` (``Config.settings.policy``)."""
        return cls(
            max_depth=policy.max_depth,
            max_builds=policy.max_builds_per_session,
            max_added_bytes=policy.max_added_bytes,
            allow_fixed_output=policy.allow_fixed_output,
            max_connections=policy.max_connections_per_session,
            existing_fixed_outputs=policy.existing_fixed_outputs,
            forward_build_logs=policy.forward_build_logs,
        )


def opt_in_mode(drv: Derivation) -> str | None:
    """'full', 'readonly' or None (the build did not opt in), from its system features."""
    features = drv.required_system_features
    if FEATURE in features:
        return "full"
    if FEATURE_READONLY in features:
        return "readonly"
    return None


def checked_path(path: str) -> str:
    """Validate a store path received from a sandboxed client (raises Denied)."""
    try:
        return validate_store_path(path)
    except InvalidStorePath as e:
        raise Denied(str(e)) from e


def drv_closure(
    roots: Iterable[str], prune: Callable[[Derivation], bool] | None = None
) -> Iterator[tuple[str, Derivation]]:
    """Every readable derivation in the closure of ``roots`` under input derivations;
    one for which ``prune(drv)`` holds is left out with everything below it."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        drv_path = stack.pop()
        if drv_path in seen or not drv_path.endswith(".drv"):
            continue
        seen.add(drv_path)
        drv = _read(drv_path)
        if drv is None or (prune is not None and prune(drv)):
            continue
        yield drv_path, drv
        stack.extend(drv.input_drvs)


def opted_in_drvs(drvs: dict[str, Derivation]) -> list[str]:
    """The derivations among ``drvs`` that ask for a recnix session."""
    return [drv_path for drv_path, drv in drvs.items() if opt_in_mode(drv) is not None]


def requested_features(drv_path: str) -> set[str]:
    """requiredSystemFeatures of a derivation in the store (empty if unreadable)."""
    drv = _read(drv_path)
    return set(drv.required_system_features) if drv is not None else set()


def _read(drv_path: str) -> Derivation | None:
    try:
        return read_derivation(Path(drv_path))
    except (OSError, DerivationError):
        return None


# -- the one rule


@dataclass(frozen=True)
class Handout:
    """A fixed-output derivation whose existing (valid) outputs a build gets."""

    drv_path: str
    outputs: tuple[str, ...]


@dataclass
class BuildPlan:
    """What a permitted build request does: derivations it may run, outputs handed out."""

    runs: dict[str, Derivation]
    handouts: list[Handout]


def outputs_valid(drv: Derivation, is_valid: Callable[[str], bool]) -> bool:
    """All the derivation's outputs have known paths that are valid."""
    outs = [o.path for o in drv.outputs.values() if o.path]
    return bool(outs) and len(outs) == len(drv.outputs) and all(map(is_valid, outs))


_NOT_OURS = "which is neither an input of this build nor something it added or built"


def check_build(
    roots: Iterable[str],
    allowed: Collection[str],
    read: Callable[[str], Derivation | None],
    is_valid: Callable[[str], bool],
    allow_fixed_output: bool,
    existing_fixed_outputs: str = "allow",
    sound: set[str] | None = None,
) -> BuildPlan:
    """Apply rules 1 and 2 to a build of the derivations ``roots`` (raises Denied).

    ``read`` parses a ``.drv`` (None if it cannot); ``is_valid`` tells whether an
    output path exists. ``sound``: derivations already known to satisfy rule 1
    (it only depends on *allowed*, which only grows); the ones checked here are
    added to it.
    """
    roots = list(roots)
    closure: dict[str, Derivation] = {}
    checked: set[str] = set()
    stack = [(r, r) for r in roots]
    while stack:
        path, root = stack.pop()
        if path in checked:
            continue
        checked.add(path)
        drv = read(path) if path.endswith(".drv") else None
        if sound is not None and path in sound and drv is not None:
            closure[path] = drv
            stack.extend((d, root) for d in drv.input_drvs)
            continue
        via = "" if path == root else f" (in the derivation closure of '{root}')"
        if path not in allowed:
            raise Denied(f"cannot build '{path}'{via}: it is a derivation {_NOT_OURS}")
        if drv is None:
            raise Denied(f"cannot build '{path}'{via}: it is not a readable derivation")
        foreign = sorted(s for s in drv.input_srcs if s not in allowed)
        if foreign:
            raise Denied(
                f"cannot build '{path}'{via}: its text names '{foreign[0]}' as an input "
                f"source, {_NOT_OURS}; a build may only have what it can build from its "
                "inputs through derivations"
            )
        closure[path] = drv
        stack.extend((d, root) for d in drv.input_drvs)
    if sound is not None:
        sound.update(closure)
    runs: dict[str, Derivation] = {}
    handouts: list[Handout] = []
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        drv = closure[path]
        if outputs_valid(drv, is_valid):
            if drv.is_fixed_output:
                outs = tuple(sorted(o.path for o in drv.outputs.values()))
                handouts.append(Handout(path, outs))
            continue
        runs[path] = drv
        todo.extend(drv.input_drvs)
    for path, drv in sorted(runs.items()):
        if drv.is_fixed_output and not allow_fixed_output:
            raise Denied(
                f"cannot build fixed-output derivation '{path}' in recursive Nix: "
                "fixed-output builds have network access; the operator can allow them "
                "with policy.allow-fixed-output = true"
            )
    if handouts and existing_fixed_outputs != "allow":
        h = handouts[0]
        raise Denied(
            f"cannot hand out '{h.outputs[0]}', the existing output of fixed-output "
            f"derivation '{h.drv_path}': policy.existing-fixed-outputs = "
            f'"{existing_fixed_outputs}"'
        )
    return BuildPlan(runs, sorted(handouts, key=lambda h: h.drv_path))


def check_added_derivation(path: str, drv: Derivation | None, allowed: Collection[str]) -> None:
    """Rule 3: refuse an added ``*.drv`` that is no derivation or names a path not allowed."""
    if drv is None:
        raise Denied(
            f"cannot add '{path}': its name ends in .drv but it is not a derivation "
            "(recnix refuses what it cannot check)"
        )
    for named in [*drv.input_srcs, *drv.input_drvs]:
        if named not in allowed:
            raise Denied(
                f"cannot add derivation '{path}': its text names '{named}' as an input, "
                f"{_NOT_OURS}; a derivation added inside may only name inputs of this "
                "build and what it added or built"
            )
