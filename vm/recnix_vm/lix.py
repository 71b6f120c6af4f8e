"""Lix for the ``lix`` suite: a prebuilt Lix tarball and how it goes into a trixie rootfs.

The tarball (``lix-<version>-trixie-x86_64.tar.xz``: Lix installed with prefix
``/usr/local`` and sysconfdir ``/etc``, entries relative to ``/``) and
``runtime-packages.txt`` (the trixie packages it links against) live in one
directory: ``$RECNIX_LIX_DIR``, else ``../shared/lix`` next to the source tree.
``scripts/build-lix-tarball.sh`` makes both from a Lix source tree.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .image import ImageError

LIX_DIR_ENV = "RECNIX_LIX_DIR"
BUILD_SCRIPT = "scripts/build-lix-tarball.sh"
TARBALL_GLOB = "lix-*-trixie-x86_64.tar.xz"
RUNTIME_PACKAGES = "runtime-packages.txt"
# /etc/nix/nix.conf of the lix rootfs (the tests' daemons have their own NIX_CONF_DIR).
NIX_CONF = "build-users-group = nixbld\nsandbox = true\nsubstituters =\n"


class LixUnavailable(ImageError):
    """No Lix tarball at hand (the message says how to make one)."""


@dataclass(frozen=True)
class LixTarball:
    tarball: Path
    runtime_packages: tuple[str, ...]

    @property
    def version(self) -> str:
        """``"2.95.3"`` from ``lix-2.95.3-trixie-x86_64.tar.xz``."""
        return self.tarball.name.removeprefix("lix-").split("-trixie", 1)[0]

    def key(self) -> str:
        """A short hash of the tarball's bytes (part of the rootfs directory's name)."""
        st = self.tarball.stat()
        return _file_hash(str(self.tarball), st.st_size, st.st_mtime_ns)[:12]


@functools.cache
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lix_dir(source_tree: Path) -> Path:
    """Where the Lix tarball is looked for."""
    return Path(os.environ.get(LIX_DIR_ENV) or source_tree.parent / "shared/lix")


def find_tarball(source_tree: Path) -> LixTarball:
    """The Lix tarball to install; :class:`LixUnavailable` with a how-to when there is none."""
    where = lix_dir(source_tree)
    tarballs = sorted(where.glob(TARBALL_GLOB))
    packages = where / RUNTIME_PACKAGES
    if not tarballs or not packages.is_file():
        raise LixUnavailable(
            f"no Lix tarball ({TARBALL_GLOB} and {RUNTIME_PACKAGES}) in {where}: build one "
            f"from a Lix source tree with `{BUILD_SCRIPT} LIX_SOURCE_DIR {where}` "
            f"(or point ${LIX_DIR_ENV} at a directory holding them)"
        )
    names = tuple(p for p in packages.read_text().split() if p)
    return LixTarball(tarballs[-1], names)
