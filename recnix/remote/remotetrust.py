"""How far this machine trusts an ``ssh-ng://`` builder with paths it sends back.

Nix's build-remote trusts a builder for the outputs of the derivations it sent,
and for nothing else. recnix's ssh proxy also brings back the rest of the
outputs' closure (the outputs of nested builds, what they added), which the
builder chose; a path of it is admitted only if

* it is content-addressed and its path is the one its content address names
  (the importing daemon then checks the content against that address, as Nix
  does for every content-addressed path), or
* it carries a signature by a key in this machine's ``trusted-public-keys``, or
* it is the output of an input-addressed derivation whose ``.drv`` the builder
  has too: every ``.drv`` read is checked to be the text path of its contents,
  and the output path is recomputed from them (Nix's hashDerivationModulo), or
* the operator named the builder in ``remote.trusted-builders``.

Anything else fails the build with a message naming the path, the builder and
the setting. The walk starts from the outputs and follows references only, so
each admitted path is reachable from what was sent through admitted paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from recnix.formats.derivation import (
    Derivation,
    DerivationError,
    input_addressed_output_paths,
    parse_derivation,
)
from recnix.formats.signatures import signed_by
from recnix.formats.storepath import (
    InvalidStorePath,
    content_address_path,
    make_text_path,
    store_path_name,
    validate_store_path,
)
from recnix.protocol import PathInfo

SETTING = "remote.trusted-builders"
# Bounds on what a builder can make the proxy read to prove one output.
MAX_DRVS = 20000
MAX_DRV_BYTES = 64 * 1024 * 1024

DrvReader = Callable[[str], Awaitable[bytes]]


class UntrustedPath(Exception):
    """A path the builder offered that this machine does not trust."""


@dataclass(frozen=True)
class Admission:
    """Why a path is admitted; ``check_sigs``: import it with the daemon's own signature
    check (content-addressed or signed paths pass it), else as a trusted import."""

    reason: str
    check_sigs: bool


def ssh_destination(args: list[str]) -> str:
    """The destination (``[user@]host``) of an ssh argument list, ``-l user`` applied."""
    with_value = set("BbcDEeFIiJLlmOopQRSWw")
    user = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        flags = a[1:]
        for j, flag in enumerate(flags):
            if flag in with_value:
                value = flags[j + 1 :] or (args[i + 1] if i + 1 < len(args) else "")
                if not flags[j + 1 :]:
                    i += 1
                if flag == "l":
                    user = value
                break
        i += 1
    host = args[i] if i < len(args) else ""
    if user and "@" not in host:
        host = f"{user}@{host}"
    return host


def _bare(entry: str) -> str:
    """``ssh-ng://user@host?opts`` -> ``user@host``."""
    for scheme in ("ssh-ng://", "ssh://"):
        entry = entry.removeprefix(scheme)
    return entry.split("?", 1)[0].rstrip("/")


def builder_trusted(destination: str, trusted: Iterable[str]) -> bool:
    """Whether ``destination`` (as ssh got it) is named in ``remote.trusted-builders``:
    an entry ``host`` or ``ssh-ng://host`` names every user at that host, one with a user
    only that user."""
    host = destination.rsplit("@", 1)[-1]
    for entry in trusted:
        bare = _bare(entry.strip())
        if bare and bare in (destination, host):
            return True
    return False


def untrusted_message(path: str, host: str, why: str) -> str:
    """The error for a path refused: the path, the builder, and what would admit it."""
    return (
        f"{host} sent back {path}, which is not an output of the derivations this machine "
        f"sent it, and this machine cannot trust it ({why}); it was not imported. Nix's own "
        "build-remote would not copy it either. To accept such paths, sign them on the "
        "builder with a key in this machine's nix.conf trusted-public-keys (`nix store sign "
        f"--key-file …`, or secret-key-files there), or name the builder in recnix's "
        f'`{SETTING}` (e.g. {SETTING} = ["{_bare(host)}"] in /etc/recnix/config.toml) '
        "if you trust it with every path it sends"
    )


class TrustCheck:
    """Decides, path by path, whether to import what one builder sent back."""

    def __init__(
        self,
        host: str,
        trusted_builder: bool,
        public_keys: Callable[[], dict[str, bytes]],
        read_drv: DrvReader,
        valid_here: Callable[[str], Awaitable[bool]],
    ) -> None:
        """``public_keys()``: this machine's trusted keys (asked only when needed);
        ``read_drv(path)``: a ``.drv``'s contents as the builder (or this store) has them,
        not yet checked; ``valid_here(path)``: whether this machine's store has it."""
        self.host = host
        self.trusted_builder = trusted_builder
        self._public_keys = public_keys
        self._keys: dict[str, bytes] | None = None
        self._read_drv = read_drv
        self._valid_here = valid_here
        self._drvs: dict[str, Derivation] = {}
        self._hashes: dict[str, dict[str, str]] = {}

    @property
    def keys(self) -> dict[str, bytes]:
        if self._keys is None:
            self._keys = self._public_keys()
        return self._keys

    async def admit(self, path: str, info: PathInfo) -> Admission:
        """Why ``path`` (not an output that was sent) may be imported; UntrustedPath if not."""
        if self.trusted_builder:
            return Admission(f"{self.host} is in {SETTING}", check_sigs=False)
        if info.ca:
            try:
                expected = content_address_path(
                    info.ca, store_path_name(path), info.references, path
                )
            except (ValueError, InvalidStorePath) as e:
                raise UntrustedPath(
                    untrusted_message(path, self.host, f"content address {info.ca!r}: {e}")
                ) from e
            if expected != path:
                raise UntrustedPath(
                    untrusted_message(
                        path,
                        self.host,
                        f"its content address {info.ca!r} names {expected}, not this path",
                    )
                )
            return Admission("content-addressed", check_sigs=True)
        if info.sigs and self.keys:
            key = signed_by(
                path, info.nar_hash, info.nar_size, info.references, info.sigs, self.keys
            )
            if key is not None:
                return Admission(f"signed by {key}", check_sigs=True)
        why = "no content address, no signature by a key in trusted-public-keys"
        if not info.deriver:
            raise UntrustedPath(untrusted_message(path, self.host, f"{why}, no deriver"))
        try:
            await self.prove_output(path, info.deriver)
        except UntrustedPath as e:
            raise UntrustedPath(untrusted_message(path, self.host, f"{why}, and {e}")) from None
        return Admission(f"output of {info.deriver}", check_sigs=False)

    async def prove_output(self, path: str, deriver: str) -> None:
        """Show that ``path`` is an output of the input-addressed ``deriver``, which this
        machine does not have: a derivation it has, and has not built, it builds or
        substitutes itself rather than take a builder's word for its outputs."""
        if await self._valid_here(deriver):
            raise UntrustedPath(
                f"its deriver {deriver} is a derivation of this machine, not built here: "
                "its outputs come from a build or substitution here, not from a builder"
            )
        drv = await self.derivation(deriver)
        try:
            computed = input_addressed_output_paths(drv, self._drvs.__getitem__, self._hashes)
        except DerivationError as e:
            raise UntrustedPath(f"the output paths of {deriver} cannot be computed: {e}") from e
        except KeyError as e:  # not loaded: derivation() loads the whole .drv closure
            raise UntrustedPath(f"{e} is missing from the .drv closure of {deriver}") from e
        except RecursionError:
            raise UntrustedPath(f"the .drv closure of {deriver} is too deep to hash") from None
        if path not in computed.values():
            raise UntrustedPath(f"it is not an output of its deriver {deriver}")
        for name, out in computed.items():
            if drv.outputs[name].path != out:
                raise UntrustedPath(f"{deriver} names output {name!r} other than its inputs do")

    async def derivation(self, drv_path: str) -> Derivation:
        """``drv_path`` and its input ``.drv`` closure, each checked to be the text path of
        its contents; DerivationErrors and mismatches raise UntrustedPath."""
        todo = [drv_path]
        while todo:
            path = todo.pop()
            if path in self._drvs:
                continue
            if len(self._drvs) >= MAX_DRVS:
                raise UntrustedPath(f"the .drv closure of {drv_path} has over {MAX_DRVS} paths")
            drv = await self._checked_drv(path)
            self._drvs[path] = drv
            todo.extend(p for p in drv.input_drvs if p not in self._drvs)
        return self._drvs[drv_path]

    async def _checked_drv(self, path: str) -> Derivation:
        try:
            validate_store_path(path)
        except InvalidStorePath as e:
            raise UntrustedPath(f"its deriver is not a store path: {e}") from e
        name = store_path_name(path)
        if not name.endswith(".drv"):
            raise UntrustedPath(f"its deriver {path} is not a .drv")
        text = await self._read_drv(path)
        if len(text) > MAX_DRV_BYTES:
            raise UntrustedPath(f"{path} is larger than {MAX_DRV_BYTES} bytes")
        try:
            drv = parse_derivation(text, name[: -len(".drv")])
        except DerivationError as e:
            raise UntrustedPath(f"{path} is not a derivation: {e}") from e
        refs = set(drv.input_srcs) | set(drv.input_drvs)
        if make_text_path(name, text, refs) != path:
            raise UntrustedPath(f"{path} is not the store path of its contents")
        return drv
