"""What differs between the Nix versions the tests run against, in one place.

The tests run against the Nix on ``PATH``: Debian 12's nix-bin 2.8 on the
host, Debian 13's 2.26 or sid's 2.34 inside a suite's root filesystem
(``recnix_vm.rootfs``) or guest. Tests ask this module instead of writing a
version's paths, JSON shapes, protocol minors or wording into themselves.

Known versions (Debian's nix-bin): 2.8.0 (bookworm), 2.26.3 (trixie),
2.34.x (sid). A version this module does not know fails the tests that need
a fact about it, with a message saying so.
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


@functools.cache
def version() -> tuple[int, int, int]:
    """The version of the ``nix`` on PATH (or the system PATH), e.g. ``(2, 8, 0)``."""
    nix = shutil.which("nix") or shutil.which("nix", path=SYSTEM_PATH)
    if nix is None:
        raise AssertionError("no nix on PATH: install Debian's nix-bin (./setup.sh)")
    out = subprocess.run([nix, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise AssertionError(f"{nix} --version printed {out!r}: no version number")
    major, minor, patch = (int(g) for g in found.groups())
    return major, minor, patch


def version_string() -> str:
    """``"2.8.0"``: what ``nix --version`` and the daemon's handshake report."""
    return ".".join(map(str, version()))


def at_least(major: int, minor: int) -> bool:
    """Whether the Nix under test is ``major.minor`` or newer."""
    return version()[:2] >= (major, minor)


def label() -> str:
    """``"Nix 2.8.0"`` for messages and test ids."""
    return f"Nix {version_string()}"


def daemon_minor() -> int:
    """The protocol minor the nix-daemon under test advertises."""
    try:
        return DAEMON_MINOR[version()[:2]]
    except KeyError:
        raise AssertionError(
            f"{label()}: its daemon's protocol minor is not in tests/nixversion.py"
        ) from None


def negotiated_minor(client_minor: int) -> int:
    """The minor a client asking for ``client_minor`` ends up with against this daemon."""
    return min(client_minor, daemon_minor())


# -- where builds run -------------------------------------------------------------------


def build_dir_conf(build_root: Path) -> str:
    """nix.conf lines that put a test daemon's build directories below ``build_root``.

    Nix 2.8 uses ``TMPDIR`` (the test daemons set it); 2.26 on have ``build-dir``, and
    2.30 on ignore ``TMPDIR`` (default ``/nix/var/nix/builds``).
    """
    return f"build-dir = {build_root}\n" if at_least(2, 26) else ""


def build_top_glob(build_root: Path | str, drv_name: str) -> str:
    """Glob of the builder's working directory (``$NIX_BUILD_TOP``) of a build of the
    derivation named ``drv_name`` below ``build_root``.

    2.8: ``<root>/nix-build-<name>.drv-<n>``; 2.26: ``…/build`` below that; 2.30 on:
    ``<root>/nix-<pid>-<n>/build`` (the name is not in it: any build matches).
    """
    if at_least(2, 30):
        return f"{build_root}/nix-*/build"
    if at_least(2, 26):
        return f"{build_root}/nix-build-{drv_name}.drv-*/build"
    return f"{build_root}/nix-build-{drv_name}.drv-*"


def sandbox_root(drv_path: str) -> Path:
    """The sandbox's root directory for a build of ``drv_path`` as the host sees it
    (what the pre-build hook receives): ``<drv>.chroot`` on 2.8, ``<drv>.chroot/root``
    from 2.26 on."""
    chroot = Path(drv_path + ".chroot")
    return chroot / "root" if at_least(2, 26) else chroot


def sandbox_dir_marker() -> str:
    """What a mount table shows for a sandbox's root on this version."""
    return ".drv.chroot"


# -- the CLI's JSON -------------------------------------------------------------------


def path_info_args() -> list[str]:
    """``nix path-info`` arguments for JSON format 1 (full paths, string hashes)."""
    return ["--json", "--json-format", "1"] if at_least(2, 33) else ["--json"]


def path_info_record(text: str, path: str) -> dict:
    """``path``'s record in ``nix path-info --json`` output: a list (2.8) or an object
    keyed by store path (2.19 on)."""
    data = json.loads(text)
    if isinstance(data, list):
        (record,) = [r for r in data if r.get("path") == path]
        return record
    return data[path]


def show_derivation_args() -> list[str]:
    """How to print a .drv as JSON: ``nix show-derivation`` (2.8), ``nix derivation show``."""
    return ["derivation", "show"] if at_least(2, 26) else ["show-derivation"]


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


# -- the nix binary and the daemon's replies -----------------------------------------


def links_libnixstore() -> bool:
    """Whether Debian's ``nix`` binary links ``libnixstore.so`` (2.8 only; newer Debian
    packages link Nix's libraries statically)."""
    return not at_least(2, 26)


def daemon_reports_times_built() -> bool:
    """Whether the daemon fills ``timesBuilt``, ``startTime`` and ``stopTime`` of a
    fresh build's result (2.34 reports 0 for all three)."""
    return not at_least(2, 34)
