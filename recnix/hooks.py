"""Nix's ``pre-build-hook`` and ``post-build-hook`` entry points.

Both run for every build on the machine, so the path for builds that did not
opt in is short: read the ``.drv``, look for the feature name, chain any
configured hooks, exit 0. Heavier modules are imported only for opted-in
builds. A hook that fails makes Nix fail the build, so unrelated builds must
never see an error from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SANDBOX_SOCKET = "/nix/var/nix/daemon-socket/socket"
FEATURE = b"recnix"

# Written into the sandbox so `nix` (new CLI) works there and never tries the
# network (Nix issues #3275, #8698).
SANDBOX_NIX_CONF = """\
# written by recnix's pre-build hook for the Nix client inside this build
experimental-features = nix-command
substituters =
"""


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

    name = os.path.basename(drv_path)
    drv = parse_derivation(data, name=name[33:-4] if name.endswith(".drv") else None)
    features = drv.required_system_features
    if "recnix" in features:
        return "full"
    if "recnix-readonly" in features:
        return "readonly"
    return None


def _run_chained(hooks: list[str], args: list[str], env: dict[str, str] | None = None) -> str:
    """Run further hooks in order; return their stdout, each block closed by an empty line."""
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

    mode = requested_mode(drv_path)
    config = load_config()
    block = ""
    if mode is not None:
        if not chroot:
            raise HookError(
                f"{drv_path} requires recnix but is not built in a sandbox; "
                "set `sandbox = true` and `sandbox-fallback = false` in nix.conf"
            )
        from recnix import control

        if config.policy["readonly-only"]:
            mode = "readonly"
        try:
            reply = control.request(
                config.control_socket,
                {"op": "open", "drv": drv_path, "chroot": chroot, "mode": mode},
                timeout=None,
            )
        except control.ControlError as e:
            raise HookError(f"cannot open a recnix session for {drv_path}: {e}") from e
        _write_sandbox_nix_conf(Path(chroot))
        block = f"extra-sandbox-paths\n{SANDBOX_SOCKET}={reply['socket']}\n\n"
    args = [drv_path] + ([chroot] if chroot else [])
    return block + _run_chained(config["hooks"]["pre-build"], args)


def _write_sandbox_nix_conf(chroot: Path) -> None:
    conf_dir = chroot / "etc" / "nix"
    conf = conf_dir / "nix.conf"
    if conf.exists() or conf.is_symlink():
        return
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text(SANDBOX_NIX_CONF)
    conf.chmod(0o444)


def post_build(drv_path: str, out_paths: list[str]) -> list[str]:
    """Finalise the session of an opted-in build; return the lines to show in its log."""
    from recnix.config import load_config

    lines: list[str] = []
    config = load_config()
    if drv_path and requested_mode(drv_path) is not None:
        from recnix import control

        try:
            reply = control.request(
                config.control_socket,
                {"op": "finalise", "drv": drv_path, "out_paths": out_paths},
                timeout=None,
            )
        except control.ControlError as e:
            raise HookError(f"recnix could not finalise {drv_path}: {e}") from e
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
