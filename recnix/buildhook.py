"""``recnix build-hook``: Nix's own build hook, with recnix's ``ssh`` first on its PATH.

nix.conf's ``build-hook`` is the program the nix-daemon runs to dispatch builds
to remote machines (default: Nix 2.8 ``<libexec>/nix/build-remote``, Nix >=
2.19 ``nix __build-remote``; every version registers ``build-remote`` as a
legacy command of the ``nix`` binary, chosen by ``argv[0]``). This one execs
that same program (``nix`` on PATH, or ``$RECNIX_NIX``, as ``build-remote``)
with the same arguments and file descriptors, after putting
``recnix/sshshim`` first on PATH: build-remote then opens ``ssh-ng://``
sessions through :mod:`recnix.sshproxy`. Standard library only (Nix starts it
once per building worker).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

NIX_ENV = "RECNIX_NIX"


def shim_dir() -> Path:
    """The directory of recnix's ``ssh``."""
    return Path(__file__).resolve().parent / "sshshim"


def hook_env(environ: dict[str, str]) -> dict[str, str]:
    """build-remote's environment: PATH with the shim first, and what the shim runs."""
    env = dict(environ)
    path = env.get("PATH") or os.defpath
    ssh = env.get("RECNIX_REAL_SSH") or shutil.which("ssh", path=path)
    env["PATH"] = f"{shim_dir()}{os.pathsep}{path}"
    if ssh:
        env["RECNIX_REAL_SSH"] = ssh
    env["RECNIX_HOOK_PYTHON"] = sys.executable
    env["RECNIX_HOOK_ENTRY"] = str(Path(__file__).resolve().with_name("hookentry.py"))
    return env


def main(argv: list[str]) -> int:
    """Exec Nix's build-remote with ``argv`` (Nix passes its verbosity)."""
    nix = os.environ.get(NIX_ENV) or shutil.which("nix")
    if not nix:
        print(
            "recnix build-hook: no nix on PATH (nix-daemon's PATH); set RECNIX_NIX to the "
            "nix binary, or set nix.conf build-hook back to Nix's default",
            file=sys.stderr,
        )
        return 1
    os.execve(nix, ["build-remote", *argv], hook_env(dict(os.environ)))
    return 1  # not reached
