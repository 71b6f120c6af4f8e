"""The environment of the Nix commands recnix runs itself, whether or not a dead
daemon socket lies around.

Since Lix 2.94 the default store (``auto``) is the daemon whenever
``/nix/var/nix/daemon-socket/socket`` exists, for root too, and a killed Lix
daemon leaves that file behind: every command then fails with "cannot connect
to socket". (Nix 2.8-2.34 fall back to the local store for root.) So:

* commands that must work on the local store (re-registration, ``nix-daemon
  --stdio`` behind ``daemon.upstream = "stdio"``) get ``NIX_REMOTE=local``
  always (:func:`local_env`);
* commands that should use whatever store the user's Nix would (``recnix
  bundle-nix``/``busybox``, ``recnix tree``, doctor's questions) keep the
  environment's ``NIX_REMOTE`` if set; else, as root, with a socket file that
  nobody answers on, they use the local store instead of that dead socket
  (:func:`client_env`).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping

DEFAULT_SOCKET = "/nix/var/nix/daemon-socket/socket"
CONNECT_TIMEOUT = 5.0


def socket_path(env: Mapping[str, str]) -> str:
    """The daemon socket the ``auto`` store looks at."""
    return env.get("NIX_DAEMON_SOCKET_PATH") or DEFAULT_SOCKET


def probe_socket(path: str, timeout: float = CONNECT_TIMEOUT) -> bool | None:
    """None if there is no socket file at ``path``, else whether a connect() there succeeds."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def dead_socket(path: str) -> bool:
    """Whether ``path`` is a socket file on which nobody accepts connections."""
    return probe_socket(path) is False


def local_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the local store, never a daemon."""
    out = dict(os.environ if env is None else env)
    out["NIX_REMOTE"] = "local"
    return out


def client_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a Nix command that should use the user's
    store: unchanged, except that root goes to the local store instead of a dead socket."""
    out = dict(os.environ if env is None else env)
    if not out.get("NIX_REMOTE") and os.geteuid() == 0 and dead_socket(socket_path(out)):
        out["NIX_REMOTE"] = "local"
    return out
