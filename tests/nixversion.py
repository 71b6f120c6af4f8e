"""What differs between the Nix versions the tests run against, in one place.

The tests run against the Nix on ``PATH``: Debian 12's nix-bin 2.8 on the
host, Debian 13's 2.26 or sid's 2.34 inside a suite's root filesystem
(``recnix_vm.rootfs``) or guest. Tests ask this module instead of writing a
version's paths, JSON shapes, protocol minors or wording into themselves.

Known versions (Debian's nix-bin): 2.8.0 (bookworm), 2.26.3 (trixie),
2.34.x (sid). A version this module does not know fails the tests that need
a fact about it, with a message saying so.

Lix (the ``lix`` suite: Lix 2.95.3 in a trixie root filesystem) is an
implementation of its own, not a CppNix version: its version numbers (2.9x)
say nothing about CppNix's 2.2x/2.3x changes. Every fact below answers for
Lix explicitly (:func:`is_lix`), and :func:`at_least`, which compares CppNix
versions, refuses to answer for Lix. Lix 2.95: ``nix --version`` prints
``nix (Lix, like Nix) 2.95.3`` and more lines; builds run in
``<build-dir>/<random>/b`` (default build-dir ``/nix/var/nix/b``, ``TMPDIR``
ignored); the sandbox root is ``<drv>.chroot`` (as on Nix 2.8); its daemon
speaks protocol 1.35 and refuses older clients; no built-in ``recursive-nix``
(removed in 2.93); its build hook speaks Cap'n Proto (2.94 on), so recnix's
``build-hook`` is never configured there.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The worker-protocol minor each nix-daemon advertises.
DAEMON_MINOR = {(2, 8): 34, (2, 26): 38, (2, 34): 38}
LIX_DAEMON_MINOR = {(2, 93): 35, (2, 94): 35, (2, 95): 35}
# The oldest client minor Lix's daemon accepts (MIN_SUPPORTED_MINOR_WORKER_PROTO_VERSION).
LIX_MIN_CLIENT_MINOR = 35


class Version(tuple):
    """``(major, minor, patch)``, and whether it is Lix's (``.lix``)."""

    lix: bool

    def __new__(cls, numbers: tuple[int, int, int], lix: bool = False) -> Version:
        obj = super().__new__(cls, numbers)
        obj.lix = lix
        return obj


def parse(text: str) -> Version:
    """The version in ``nix --version`` output (``"nix (Nix) 2.34.8"`` -> ``(2, 34, 8)``;
    ``"nix (Lix, like Nix) 2.95.3\\n..."`` -> ``(2, 95, 3)`` with ``.lix``)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", first)
    if found is None:
        raise AssertionError(f"`nix --version` printed {text!r}: no version number")
    major, minor, patch = (int(g) for g in found.groups())
    return Version((major, minor, patch), lix=re.search(r"\(Lix\b", first) is not None)


@functools.cache
def version() -> Version:
    """The version of the ``nix`` on PATH (or the system PATH), e.g. ``(2, 8, 0)``."""
    nix = shutil.which("nix") or shutil.which("nix", path=SYSTEM_PATH)
    if nix is None:
        raise AssertionError("no nix on PATH: install Debian's nix-bin (./setup.sh)")
    return parse(subprocess.run([nix, "--version"], capture_output=True, text=True).stdout)


def version_string() -> str:
    """``"2.8.0"``: what ``nix --version`` and the daemon's handshake report."""
    return ".".join(map(str, version()))


def is_lix(v: Version | None = None) -> bool:
    """Whether the Nix under test (or ``v``) is Lix."""
    return bool(getattr(v or version(), "lix", False))


def at_least(major: int, minor: int, v: Version | None = None) -> bool:
    """Whether the CppNix under test (or ``v``, e.g. a guest's) is ``major.minor`` or
    newer. Not for Lix (its numbers are no CppNix version): ask for the fact instead."""
    v = v or version()
    if is_lix(v):
        raise AssertionError(
            f"at_least({major}, {minor}) asked about Lix {'.'.join(map(str, v))}: Lix is no "
            "CppNix version; tests/nixversion.py must answer this fact for Lix itself"
        )
    return v[:2] >= (major, minor)


def _nix_at_least(major: int, minor: int, v: Version | None = None) -> bool:
    """CppNix ``major.minor`` or newer; False on Lix (for facts Lix shares with old Nix)."""
    return not is_lix(v) and at_least(major, minor, v)


def has_builtin_recursive_nix() -> bool:
    """Whether ``experimental-features = recursive-nix`` exists (Lix removed it in 2.93)."""
    return not is_lix() or version()[:2] < (2, 93)


def no_builtin_reason() -> str:
    """Why a test comparing with the built-in recursive-nix is skipped here."""
    return (
        f"{label()} has no built-in recursive-nix (Lix removed it in 2.93): nothing to compare with"
    )


def auto_store_takes_any_socket() -> bool:
    """Whether the ``auto`` store is the daemon whenever its socket file exists, for root
    too, even a dead one (Lix >= 2.94); Nix falls back to the local store for root."""
    return is_lix() and version()[:2] >= (2, 94)


def drops_pre_build_hook_output() -> bool:
    """Whether the pre-build hook's output (extra-sandbox-paths) is dropped (Lix 2.93-2.95)."""
    return is_lix() and (2, 93) <= version()[:2] <= (2, 95)


def uses_recnix_build_hook() -> bool:
    """Whether recnix's ``build-hook`` is configured (not on Lix: Cap'n Proto since 2.94)."""
    return not is_lix()


def ignores_conf_build_hook() -> bool:
    """Nix 2.25-2.33 ignore nix.conf's build-hook (recnix.cli.nixversion): daemons get it
    with ``--option build-hook``."""
    from recnix.cli.nixversion import NixVersion

    impl = "lix" if is_lix() else "nix"
    return NixVersion(impl, version_string()).ignores_conf_build_hook


def label() -> str:
    """``"Nix 2.8.0"`` / ``"Lix 2.95.3"`` for messages and test ids."""
    return f"{'Lix' if is_lix() else 'Nix'} {version_string()}"


def version_line(command: str = "nix") -> str:
    """The first line ``<command> --version`` prints (Lix prints more lines)."""
    kind = "Lix, like Nix" if is_lix() else "Nix"
    return f"{command} ({kind}) {version_string()}"


def daemon_minor() -> int:
    """The protocol minor the nix-daemon under test advertises."""
    table = LIX_DAEMON_MINOR if is_lix() else DAEMON_MINOR
    try:
        return table[version()[:2]]
    except KeyError:
        raise AssertionError(
            f"{label()}: its daemon's protocol minor is not in tests/nixversion.py"
        ) from None


def min_client_minor() -> int:
    """The oldest client protocol minor the daemon under test accepts."""
    return LIX_MIN_CLIENT_MINOR if is_lix() else 10


def negotiated_minor(client_minor: int) -> int:
    """The minor a client asking for ``client_minor`` ends up with against this daemon."""
    return min(client_minor, daemon_minor())


# -- where builds run -------------------------------------------------------------------


def build_dir_conf(build_root: Path) -> str:
    """nix.conf lines that put a test daemon's build directories below ``build_root``.

    Nix 2.8 uses ``TMPDIR`` (the test daemons set it); 2.26 on have ``build-dir``, and
    2.30 on ignore ``TMPDIR`` (default ``/nix/var/nix/builds``); Lix has ``build-dir``.
    """
    return f"build-dir = {build_root}\n" if is_lix() or at_least(2, 26) else ""


def daemon_build_root(test_root: Path) -> Path:
    """Where a test daemon whose private directory is ``test_root`` builds.

    ``test_root/builds``; but 2.30 on refuse a build-dir below a world-writable
    directory such as /tmp: there ``/nix/var/nix/builds/<test_root's name>`` (Lix too:
    its build-dir must not be world-writable either).
    """
    if is_lix() or at_least(2, 30):
        return Path("/nix/var/nix/builds") / test_root.name
    return test_root / "builds"


def build_top_glob(build_root: Path | str, drv_name: str, v: Version | None = None) -> str:
    """Glob of the builder's working directory (``$NIX_BUILD_TOP``) of a build of the
    derivation named ``drv_name`` below ``build_root``.

    2.8: ``<root>/nix-build-<name>.drv-<n>``; 2.26: ``…/build`` below that; 2.30 on:
    ``<root>/nix-<pid>-<n>/build`` (the name is not in it: any build matches); Lix:
    ``<root>/<random>/b``.
    """
    if is_lix(v):
        return f"{build_root}/*/b"
    if at_least(2, 30, v):
        return f"{build_root}/nix-*/build"
    if at_least(2, 26, v):
        return f"{build_root}/nix-build-{drv_name}.drv-*/build"
    return f"{build_root}/nix-build-{drv_name}.drv-*"


def default_build_root(v: Version | None = None) -> str:
    """Where a nix-daemon without ``build-dir`` and ``TMPDIR`` (a guest's) builds."""
    if is_lix(v):
        return "/nix/var/nix/b"
    return "/nix/var/nix/builds" if at_least(2, 30, v) else "/tmp"


def sandbox_root(drv_path: str) -> Path:
    """The sandbox's root directory for a build of ``drv_path`` as the host sees it
    (what the pre-build hook receives): ``<drv>.chroot`` on 2.8 and Lix,
    ``<drv>.chroot/root`` from 2.26 on."""
    chroot = Path(drv_path + ".chroot")
    return chroot / "root" if _nix_at_least(2, 26) else chroot


def sandbox_dir_marker() -> str:
    """What a mount table shows for a sandbox's root on this version."""
    return ".drv.chroot"


# -- the CLI's JSON -------------------------------------------------------------------


def path_info_args() -> list[str]:
    """``nix path-info`` arguments for JSON format 1 (full paths, string hashes; Lix has
    only that one)."""
    return ["--json", "--json-format", "1"] if _nix_at_least(2, 33) else ["--json"]


def path_info_record(text: str, path: str) -> dict:
    """``path``'s record in ``nix path-info --json`` output: a list (2.8) or an object
    keyed by store path (2.19 on)."""
    data = json.loads(text)
    if isinstance(data, list):
        (record,) = [r for r in data if r.get("path") == path]
        return record
    return data[path]


def show_derivation_args() -> list[str]:
    """How to print a .drv as JSON: ``nix show-derivation`` (2.8), ``nix derivation show``
    (2.26, 2.34, Lix)."""
    return ["derivation", "show"] if is_lix() or at_least(2, 26) else ["show-derivation"]


def show_derivation_layout_differs() -> bool:
    """Whether ``show-derivation`` output differs in layout from recnix's
    ``as_show_derivation`` (2.8's): compare :func:`derivation_projection` then."""
    return is_lix() or at_least(2, 26)


def show_derivation_record(text: str, drv_path: str) -> dict:
    """``drv_path``'s record in ``nix show-derivation`` / ``nix derivation show`` output.

    2.8 and 2.26: an object keyed by .drv path; 2.34: wrapped in ``{"derivations": …}``
    and keyed by the .drv's base name.
    """
    data = json.loads(text)
    if "derivations" in data and isinstance(data["derivations"], dict):
        data = data["derivations"]
    if drv_path in data:
        return data[drv_path]
    return data[os.path.basename(drv_path)]


def _full(path: str) -> str:
    return path if path.startswith("/") else f"/nix/store/{path}"


def derivation_projection(record: dict) -> dict:
    """The version-independent content of a ``show-derivation`` record: what 2.8's,
    2.26's and 2.34's layouts all say, in one shape.

    2.8: ``inputDrvs`` maps to output lists, fixed outputs have ``hashAlgo``
    (``r:`` for recursive) and a path; 2.26 adds ``name``, ``method`` and
    ``dynamicOutputs``; 2.34 (format version 4) has base names, ``inputs.drvs`` /
    ``inputs.srcs``, SRI hashes, no path for fixed outputs and ``structuredAttrs``
    instead of ``env.__json``.
    """
    inputs = record.get("inputs") or {}
    drvs = record.get("inputDrvs", inputs.get("drvs", {}))
    srcs = record.get("inputSrcs", inputs.get("srcs", []))
    outputs = {}
    for name, out in record["outputs"].items():
        algo = out.get("hashAlgo", "")
        method = out.get("method") or ("nar" if algo.startswith("r:") else "flat")
        if "hash" in out and not algo:
            algo = out["hash"].split("-", 1)[0]  # SRI (2.34)
        fixed = "hash" in out
        path = None if fixed else (_full(out["path"]) if "path" in out else None)
        outputs[name] = (path, method if fixed else None, algo.removeprefix("r:") or None)
    env = dict(record["env"])
    structured = record.get("structuredAttrs")
    if "__json" in env:
        structured = json.loads(env.pop("__json"))
    return {
        "outputs": outputs,
        "inputDrvs": {
            _full(p): sorted(v["outputs"] if isinstance(v, dict) else v) for p, v in drvs.items()
        },
        "inputSrcs": sorted(_full(p) for p in srcs),
        "system": record["system"],
        "builder": record["builder"],
        "args": record["args"],
        "env": env,
        "structuredAttrs": structured,
    }


# -- the nix binary and the daemon's replies -----------------------------------------


def links_libnixstore() -> bool:
    """Whether Debian's ``nix`` binary links ``libnixstore.so`` (2.8 only; newer Debian
    packages link Nix's libraries statically; Lix links ``liblix.so``)."""
    return not is_lix() and not at_least(2, 26)


def daemon_reports_times_built() -> bool:
    """Whether the daemon fills ``timesBuilt``, ``startTime`` and ``stopTime`` of a
    fresh build's result (2.34 reports 0 for all three)."""
    return not _nix_at_least(2, 34)


# -- the daemon's error wording ------------------------------------------------------


def builder_failed_message(drv_path: str, status: int) -> str:
    """What the daemon says when ``drv_path``'s builder exits with ``status``."""
    if _nix_at_least(2, 34):
        return f"Cannot build '{drv_path}'.\nReason: builder failed with exit code {status}"
    return f"builder for '{drv_path}' failed with exit code {status}"


def unsigned_add_message(path: str) -> str:
    """What the daemon says when an untrusted client adds an unsigned ``path``."""
    if is_lix() or at_least(2, 26):
        return f"cannot add path '{path}' because it lacks a signature by a trusted key"
    return f"cannot add path '{path}' because it lacks a valid signature"


def not_in_store_message(path: str) -> str:
    """What the daemon says about an argument ``path`` outside the store."""
    if _nix_at_least(2, 34):
        return f'path "{path}" is not in the Nix store'
    return f"path '{path}' is not in the Nix store"


def unbuildable_message(path: str) -> str:
    """What the daemon says when asked to build a missing ``path`` nothing can make."""
    if _nix_at_least(2, 34):
        return f"path '{path}' is required, but there is no substituter that can build it"
    return f"build of '{path}' failed"
