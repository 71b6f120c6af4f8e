"""``recnix build-hook``: nix.conf's ``build-hook``, the program the nix-daemon asks
about every build before it takes a build user for it (once per building worker).

It serves that protocol itself (:mod:`recnix.hooks.buildqueue`): a recursive build waits
("postpone") until the recnix service has a session slot for it. Builds that
may go to remote machines go to Nix's own build hook (default: Nix 2.8
``<libexec>/nix/build-remote``, Nix >= 2.19 ``nix __build-remote``; every
version registers ``build-remote`` as a legacy command of the ``nix`` binary,
chosen by ``argv[0]``), started as that program (``nix`` on PATH, or
``$RECNIX_NIX``) with ``recnix/remote/sshshim`` first on its PATH: build-remote then
opens ``ssh-ng://`` sessions through :mod:`recnix.remote.sshproxy`. Standard library
only. Not for Lix >= 2.94, whose build hook speaks Cap'n Proto.
"""

from __future__ import annotations

import os
import sys

# Neither shutil nor pathlib: Nix starts this hook once per building process, and
# their imports (re, enum, urllib.parse, ...) would cost it ~15 ms of its ~25.

NIX_ENV = "RECNIX_NIX"
_HOOKS_DIR = os.path.dirname(os.path.realpath(__file__))


def shim_dir() -> str:
    """The directory of recnix's ``ssh``."""
    return os.path.join(os.path.dirname(_HOOKS_DIR), "remote", "sshshim")


def which(name: str, path: str | None = None) -> str | None:
    """The first executable ``name`` on ``path`` (default: PATH), as ``shutil.which``
    finds a plain program name."""
    for directory in (path if path is not None else os.environ.get("PATH", os.defpath)).split(
        os.pathsep
    ):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def hook_env(environ: dict[str, str]) -> dict[str, str]:
    """build-remote's environment: PATH with the shim first, and what the shim runs."""
    env = dict(environ)
    path = env.get("PATH") or os.defpath
    ssh = env.get("RECNIX_REAL_SSH") or which("ssh", path)
    env["PATH"] = f"{shim_dir()}{os.pathsep}{path}"
    if ssh:
        env["RECNIX_REAL_SSH"] = ssh
    env["RECNIX_HOOK_PYTHON"] = sys.executable
    env["RECNIX_HOOK_ENTRY"] = os.path.join(_HOOKS_DIR, "entry.py")
    return env


def control_socket() -> str:
    """The service's control socket: rendered into nix-daemon's environment
    (``RECNIX_HOOK_SOCKET``), else from the config."""
    rendered = os.environ.get("RECNIX_HOOK_SOCKET")
    if rendered:
        return rendered
    from recnix.config.loader import load_config

    return str(load_config().control_socket)


def main(argv: list[str]) -> int:
    """Serve Nix's build hook requests (recnix.hooks.buildqueue), with Nix's build-remote
    (``argv``: Nix passes its verbosity) for the builds that may go to remote machines.

    Started by Lix >= 2.94 (Cap'n Proto on stdout), it tells Lix why it cannot serve it
    (recnix.hooks.lixhook): the build fails with that message instead of waiting for ever."""
    from recnix.hooks import lixhook

    if lixhook.is_lix_rpc_peer():
        print(f"recnix build-hook: {lixhook.refuse()}", file=sys.stderr)
        return 1
    nix = os.environ.get(NIX_ENV) or which("nix")
    if not nix:
        print(
            "recnix build-hook: no nix on PATH (nix-daemon's PATH); set RECNIX_NIX to the "
            "nix binary, or set nix.conf build-hook back to Nix's default",
            file=sys.stderr,
        )
        return 1
    from recnix.hooks import buildqueue

    try:
        return buildqueue.serve(
            [nix, *argv], hook_env(dict(os.environ)), control_socket(), argv0="build-remote"
        )
    except (buildqueue.HookProtocolError, OSError) as e:
        print(f"recnix build-hook: {e}", file=sys.stderr)
        return 1
