"""Which Nix implementation and version a ``nix`` binary is, from ``nix --version``.

Nix prints one line, ``nix (Nix) 2.8.0`` (more lines only with ``-v``); Lix prints
``nix (Lix, like Nix) 2.94.2`` and then, always, ``System type: …``, ``Store directory:
…``, ``Data directory: /opt/lix/share`` and more (``printVersion`` in Lix's
``libmain/shared.cc``). Only the first line names the implementation and the version.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

# 2.8.0, 2.90.0-lix, 2.94.0-dev-pre20250101-abcdef0, 2.34.0pre20250101_abcdef0
_VERSION = re.compile(r"[0-9]+\.[0-9]+(?:\.[0-9]+)?[0-9A-Za-z.+_-]*")
VERSION_TIMEOUT = 30.0


class NixVersionError(ValueError):
    """``nix --version`` printed something that is not a version (message quotes it)."""


@dataclass(frozen=True)
class NixVersion:
    """``implementation`` is "nix" or "lix"; ``version`` as printed (e.g. "2.94.2")."""

    implementation: str
    version: str

    @property
    def is_lix(self) -> bool:
        return self.implementation == "lix"

    @property
    def ignores_conf_build_hook(self) -> bool:
        """Nix 2.25 to 2.33 read nix.conf, forget that it set ``build-hook`` and then set
        the setting to Nix's own hook (``src/nix/main.cc``: ``setDefault`` after
        ``initNix`` and its ``resetOverridden``); only ``--option build-hook`` on the
        command line, applied later, sticks. 2.34 sets the default first."""
        return not self.is_lix and (2, 25) <= self.release[:2] < (2, 34)

    @property
    def release(self) -> tuple[int, ...]:
        """The leading numbers of the version: (2, 94, 2)."""
        return tuple(int(n) for n in re.findall(r"[0-9]+", self.version.split("-")[0])[:3])


def parse_nix_version(text: str) -> NixVersion:
    """Parse the output of ``nix --version`` (Nix's or Lix's)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise NixVersionError("`nix --version` printed nothing")
    first = lines[0]
    words = first.split()
    version = words[-1] if words else ""
    if not _VERSION.fullmatch(version):
        raise NixVersionError(f"`nix --version` printed no version on its first line: {first!r}")
    implementation = "lix" if re.search(r"\(Lix\b", first) else "nix"
    return NixVersion(implementation, version)


def nix_version(nix: str) -> NixVersion:
    """Run ``<nix> --version`` and parse it; NixVersionError (or OSError) on failure."""
    try:
        result = subprocess.run(
            [nix, "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NixVersionError(
            f"`{nix} --version` did not answer in {VERSION_TIMEOUT:.0f} s"
        ) from None
    if result.returncode != 0:
        raise NixVersionError(
            f"`{nix} --version` exited with {result.returncode}: {result.stderr.strip()}"
        )
    return parse_nix_version(result.stdout)
