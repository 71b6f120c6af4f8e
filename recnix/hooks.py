"""Nix's ``pre-build-hook`` and ``post-build-hook`` entry points.

Both run for every build on the machine. The sh scripts in ``bin/`` drop
builds whose ``.drv`` does not mention recnix before Python starts; what
reaches this module is one short control request: the service reads the
``.drv``, decides whether the build opted in, and does the work. Only when
the service is down does the hook parse the ``.drv`` itself, so that a build
that did not opt in still never fails here. Keep the imports light: this runs
on the critical path of every opted-in build.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from recnix import control

if TYPE_CHECKING:
    from pathlib import Path

# The session's socket directory is bind-mounted here, so that the sandbox sees
# the socket of a restarted service too; clients connect to <dir>/socket.
SANDBOX_SOCKET_DIR = "/nix/var/nix/daemon-socket"
FEATURE = b"recnix"


class HookError(Exception):
    """An opted-in build cannot get (or finish) its recnix session."""


def _read_drv(drv_path: str) -> bytes | None:
    try:
        with open(drv_path, "rb") as f:
            return f.read()
    except OSError:
        # Nix issue #9272: with BuildDerivation the .drv may not exist. Such a
        # build cannot have opted in through us.
        return None


def requested_mode(drv_path: str) -> str | None:
    """'full', 'readonly' or None (not opted in) for the derivation at ``drv_path``."""
    data = _read_drv(drv_path)
    if data is None or FEATURE not in data:
        return None
    from recnix.derivation import parse_derivation
    from recnix.policy import opt_in_mode

    name = os.path.basename(drv_path)
    return opt_in_mode(parse_derivation(data, name=name[33:-4] if name.endswith(".drv") else None))


def _ask_service(
    control_socket: Path, message: dict[str, Any], failure: str
) -> dict[str, Any] | None:
    """Send ``message``; None when the service is down and the build did not opt in.

    ``failure`` prefixes the error of an opted-in build (or of a refusal).
    """
    drv_path = str(message["drv"])
    try:
        return control.request(control_socket, message, timeout=None)
    except control.ServiceUnreachable as e:
        if requested_mode(drv_path) is None:
            return None
        raise HookError(f"{failure}: {e}") from e
    except control.ControlError as e:
        raise HookError(f"{failure}: {e}") from e


def _run_chained(hooks: list[str], args: list[str], env: dict[str, str] | None = None) -> str:
    """Run further hooks in order; return their stdout, each block closed by an empty line."""
    if not hooks:
        return ""
    import subprocess

    out = []
    for hook in hooks:
        proc = subprocess.run([hook, *args], stdout=subprocess.PIPE, env=env, check=False)
        if proc.returncode != 0:
            raise HookError(f"chained hook {hook} exited with status {proc.returncode}")
        text = proc.stdout.decode(errors="surrogateescape").strip("\n")
        if text.strip():
            # Nix's parser rejects an empty line outside a block: exactly one
            # empty line ends each block.
            out.append(text + "\n\n")
    return "".join(out)


def pre_build(drv_path: str, chroot: str | None) -> str:
    """Open a session for an opted-in build; return the text Nix reads from the hook."""
    from recnix.config import load_config

    config = load_config()
    reply = _ask_service(
        config.control_socket,
        {"op": "open", "drv": drv_path, "chroot": chroot},
        f"cannot open a recnix session for {drv_path}",
    )
    block = ""
    if reply is not None and reply.get("socket_dir"):
        block = f"extra-sandbox-paths\n{SANDBOX_SOCKET_DIR}={reply['socket_dir']}\n\n"
    args = [drv_path] + ([chroot] if chroot else [])
    return block + _run_chained(config["hooks"]["pre-build"], args)


def post_build(drv_path: str, out_paths: list[str]) -> list[str]:
    """Finalise the session of an opted-in build; return the lines to show in its log."""
    from recnix.config import load_config

    lines: list[str] = []
    config = load_config()
    if drv_path:
        reply = _ask_service(
            config.control_socket,
            {"op": "finalise", "drv": drv_path, "out_paths": out_paths},
            f"recnix could not finalise {drv_path}",
        )
        if reply is not None:
            lines.extend(reply.get("messages", []))
    chained = config["hooks"]["post-build"]
    if chained:
        _run_chained(chained, [], env=dict(os.environ))
    return lines


def pre_build_main(argv: list[str] | None = None) -> int:
    """Console entry point for nix.conf's ``pre-build-hook``: argv = DRV [CHROOT]."""
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: recnix-pre-build-hook DRV [CHROOT]", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(pre_build(args[0], args[1] if len(args) > 1 else None))
    except Exception as e:  # any failure must name the build, and fail only this build
        message = " ".join(f"recnix: {e}".split())
        print(message, file=sys.stderr)
        # Nix shows a failing hook's stderr only in the daemon's log, but it
        # quotes an unknown hook command in the error the client sees: this
        # line fails the build with our message.
        sys.stdout.write(message + "\n")
        return 0
    return 0


def post_build_main(argv: list[str] | None = None) -> int:
    """Console entry point for nix.conf's ``post-build-hook`` (env DRV_PATH, OUT_PATHS)."""
    drv_path = os.environ.get("DRV_PATH", "")
    out_paths = os.environ.get("OUT_PATHS", "").split()
    try:
        for line in post_build(drv_path, out_paths):
            print(f"recnix: {line}")
    except Exception as e:
        print(f"recnix post-build hook: {e}", file=sys.stderr)
        return 1
    return 0
