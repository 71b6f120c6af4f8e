"""What a session may do: the restricted view's decisions, kept apart from I/O.

``Denied`` carries the message the in-sandbox client sees; it always names the
path or operation and says what to do about it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from recnix.config import FEATURE, FEATURE_READONLY
from recnix.derivation import Derivation, DerivationError, read_derivation
from recnix.storepath import InvalidStorePath, validate_store_path


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

    @classmethod
    def from_policy(cls, policy: dict) -> Limits:
        return cls(
            max_depth=policy["max-depth"],
            max_builds=policy["max-builds-per-session"],
            max_added_bytes=policy["max-added-bytes"],
            allow_fixed_output=policy["allow-fixed-output"],
            max_connections=policy["max-connections-per-session"],
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


def path_part(derived_path: str) -> str:
    """The store path part of a DerivedPath string (``drv!out`` -> ``drv``)."""
    return derived_path.split("!", 1)[0]


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


def to_build(roots: Iterable[str], is_valid_output: Callable[[str], bool]) -> dict[str, Derivation]:
    """The derivations a build of ``roots`` may have to build, by path: those of the
    closure but a derivation whose outputs all exist (``is_valid_output(path)``), and
    what is below it, which Nix builds neither."""

    def built(drv: Derivation) -> bool:
        outs = [o.path for o in drv.outputs.values() if o.path]
        return bool(outs) and len(outs) == len(drv.outputs) and all(map(is_valid_output, outs))

    return dict(drv_closure(roots, prune=built))


def fixed_output_drvs(drvs: dict[str, Derivation]) -> list[str]:
    """The fixed-output derivations among ``drvs`` (which :func:`to_build` returned)."""
    return [drv_path for drv_path, drv in drvs.items() if drv.is_fixed_output]


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
