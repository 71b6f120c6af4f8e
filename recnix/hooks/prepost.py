"""Nix's ``pre-build-hook`` and ``post-build-hook`` entry points.

Both run for every build on the machine. The sh script in ``bin/`` drops
builds whose ``.drv`` does not mention recnix before Python starts; what
reaches this module is one short control request: the service reads the
``.drv``, decides whether the build opted in, and does the work. Only when
the service is down does the hook parse the ``.drv`` itself, so that a build
that did not opt in still never fails here. A post-build hook that cannot get
its build finalised (service down, dying mid-call, or refusing) makes the
outputs of an opted-in build invalid (``recnix.store.invalidate``): finalisation is
all or nothing. The script also passes the control
socket it read from the config (``--control-socket``), which spares this
module the TOML parser. Keep the imports light: this runs on the critical path
of every opted-in build.
"""

from __future__ import annotations

import os
import sys

from recnix.config import names
from recnix.config.names import SANDBOX_SOCKET_DIR
from recnix.hooks import control

# Not typing.TYPE_CHECKING: importing typing costs every hook call ~3 ms.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

SOCKET_OPTION = "--control-socket"
# The service's refusal that bin/recnix-hook-channel got over the hook channel
# (recnix.hooks.channel): reported by the Python hook, as if it had asked.
REFUSED_OPTION = "--refused"
FAILED_OPTION = "--failed"
# Where Nix honours the hook's output (extra-sandbox-paths), the session's socket
# directory is bind-mounted here, so that the sandbox sees the socket of a
# restarted service too; clients connect to <dir>/socket. The service also puts
# a socket of the session at this path under the chroot itself (Lix drops the
# hook's output; see recnix.sandbox.sandboxsocket).
FEATURE = names.FEATURE.encode()


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
    from recnix.formats.derivation import parse_derivation
    from recnix.store.policy import opt_in_mode

    name = os.path.basename(drv_path)
    return opt_in_mode(parse_derivation(data, name=name[33:-4] if name.endswith(".drv") else None))


def _ask_service(
    control_socket: str | Path, message: dict[str, Any], failure: str
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


def _settings(kind: str, control_socket: str | None) -> tuple[str | Path, list[str]]:
    """The control socket and the further hooks of ``kind`` to chain.

    With ``control_socket`` given (by the hook script, from the config file),
    the config is not read and nothing is chained: the script passes it only
    when the config chains no hooks of this kind.
    """
    if control_socket:
        return control_socket, []
    from recnix.config.loader import load_config

    config = load_config()
    hooks = config.settings.hooks
    return config.control_socket, list(hooks.pre_build if kind == "pre-build" else hooks.post_build)


def sandbox_paths_block(socket_dir: str, sandbox_dir: str = SANDBOX_SOCKET_DIR) -> str:
    """The hook output that has Nix bind ``socket_dir`` at ``sandbox_dir`` in the sandbox
    (one ``extra-sandbox-paths`` block, closed by its empty line)."""
    return f"extra-sandbox-paths\n{sandbox_dir}={socket_dir}\n\n"


def _guard_block(control_socket: str | Path, drv_path: str, chroot: str) -> str:
    """For a build whose .drv is not in this store (a remote BuildDerivation, see
    ``recnix.remote.guards``): mount a guard socket that fails any Nix call inside with
    the cause and the fix. Nothing when the service is down."""
    try:
        reply = control.request(
            control_socket, {"op": "guard", "drv": drv_path, "chroot": chroot}, timeout=None
        )
    except control.ControlError as e:
        print(f"recnix: no guard for {drv_path} (no .drv here): {e}", file=sys.stderr)
        return ""
    return sandbox_paths_block(reply["socket_dir"])


def pre_build(drv_path: str, chroot: str | None, control_socket: str | None = None) -> str:
    """Open a session for an opted-in build; return the text Nix reads from the hook."""
    socket_path, chained = _settings("pre-build", control_socket)
    if chroot and not os.path.exists(drv_path):
        args = [drv_path, chroot]
        return _guard_block(socket_path, drv_path, chroot) + _run_chained(chained, args)
    reply = _ask_service(
        socket_path,
        {"op": "open", "drv": drv_path, "chroot": chroot, "worker": control.nix_worker_pid()},
        f"cannot open a recnix session for {drv_path}",
    )
    block = ""
    if reply is not None and reply.get("socket_dir"):
        block = sandbox_paths_block(reply["socket_dir"])
    args = [drv_path] + ([chroot] if chroot else [])
    return block + _run_chained(chained, args)


def _copy_back_note(lines: list[str]) -> list[str]:
    """A build run for a client over SSH (Nix's distributed builds) whose output
    gained references: say that Nix will not copy those paths back (issue 12)."""
    if "SSH_CONNECTION" not in os.environ or not any(x.startswith("added ") for x in lines):
        return []
    return [
        "note: this build runs for a remote client (SSH). Nix copies back only its "
        "outputs, not the paths recnix added references to, so unless the client's "
        "nix.conf has `build-hook = recnix-build-hook` (which copies them over ssh-ng://), "
        "the client's import fails with \"path '...' is not valid\". Else build on this "
        "machine's store (nix build --store ssh-ng://<this machine> --eval-store auto ..., "
        "then nix copy --from ssh-ng://<this machine> <output>), or keep recnix out of this "
        "machine's features in the client's `builders` (recnix README, 'Distributed builds')."
    ]


def post_build(drv_path: str, out_paths: list[str], control_socket: str | None = None) -> list[str]:
    """Finalise the session of an opted-in build; return the lines to show in its log."""
    lines: list[str] = []
    socket_path, chained = _settings("post-build", control_socket)
    if drv_path:
        try:
            reply = _ask_service(
                socket_path,
                {"op": "finalise", "drv": drv_path, "out_paths": out_paths},
                f"recnix could not finalise {drv_path}",
            )
        except HookError as e:
            raise HookError(invalidate_after_failure(drv_path, out_paths, str(e))) from e
        if reply is not None:
            lines.extend(reply.get("messages", []))
            lines.extend(_copy_back_note(lines))
    if chained:
        _run_chained(chained, [], env=dict(os.environ))
    return lines


def build_outputs(drv_path: str, out_paths: list[str]) -> list[str]:
    """The output paths of the build of ``drv_path``: OUT_PATHS (empty on Nix 2.8.0), the
    paths the .drv names, and for outputs it names none of (floating content-addressed)
    what ``nix-store -q --outputs`` says."""
    from recnix.formats.derivation import read_derivation

    outputs = set(out_paths)
    drv = read_derivation(drv_path)
    outputs.update(o.path for o in drv.outputs.values() if o.path)
    if not out_paths and any(not o.path for o in drv.outputs.values()):
        import subprocess

        from recnix.store.storeenv import local_env

        env = local_env()  # not the daemon (Lix >= 2.94's auto)
        queried = subprocess.run(
            ["nix-store", "-q", "--outputs", drv_path],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.update(queried.stdout.split())
    return sorted(outputs)


def invalidate_after_failure(drv_path: str, out_paths: list[str], failure: str) -> str:
    """Finalisation is all or nothing: the build of ``drv_path`` could not be finalised
    (``failure``: the service's error, or why it could not be asked), so its outputs must
    not stay valid. Makes them invalid unless the service did; the error for the log."""
    from recnix.store.invalidate import invalidate_paths, invalidated_message

    try:
        if requested_mode(drv_path) is None:
            return failure  # not a recnix build: its outputs are none of recnix's business
        done = invalidate_paths(build_outputs(drv_path, out_paths))
    except Exception as e:  # InvalidateError, an unreadable .drv, nix-store failing
        return (
            f"{failure}; and recnix could not invalidate the outputs of {drv_path} ({e}): "
            "they stay valid and may lack references: delete them with "
            "`nix-store --delete --ignore-liveness` once the build is over"
        )
    if not done:
        return failure  # the service invalidated them already, and its error says so
    return invalidated_message(done, failure)


def _split_option(args: list[str], option: str) -> tuple[str | None, list[str]]:
    """(``option``'s value or None, the remaining arguments), for an option given first:
    ``--control-socket``, or the refusal the service already gave
    ``bin/recnix-hook-channel`` (``--refused``, ``--failed``), reported here as if
    asked here."""
    if len(args) >= 2 and args[0] == option:
        return args[1], args[2:]
    return None, args


def poison_sandbox(chroot: str, message: str) -> None:
    """Make the first Nix command in the sandbox fail with ``message``.

    For a Nix that drops the hook's output (Lix 2.93–2.95), the hook's error line
    cannot fail the build: the builder would start without a socket and its Nix
    client would fail with an unrelated "creating directory '/nix/var'". An
    illegal line in the sandbox's /etc/nix/nix.conf makes that client fail with
    this message instead. Where Nix honours the hook's output, the build fails
    before its builder starts and Nix deletes the chroot with this file.
    """
    conf_dir = os.path.join(chroot, "etc", "nix")
    try:
        os.makedirs(conf_dir, mode=0o755, exist_ok=True)
        path = os.path.join(conf_dir, "nix.conf")
        if os.path.lexists(path):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        with os.fdopen(fd, "w") as f:
            f.write(f"{message}\n")
    except OSError as e:
        print(
            f"recnix: cannot write the error into {chroot}/etc/nix/nix.conf: {e}", file=sys.stderr
        )


def pre_build_main(argv: list[str] | None = None) -> int:
    """Console entry point for nix.conf's ``pre-build-hook``:
    argv = [--control-socket PATH] DRV [CHROOT]."""
    control_socket, args = _split_option(sys.argv[1:] if argv is None else argv, SOCKET_OPTION)
    refused, args = _split_option(args, REFUSED_OPTION)
    if not args or len(args) > 2 or args[0].startswith("-"):
        print(
            f"usage: recnix pre-build-hook [{SOCKET_OPTION} PATH] [{REFUSED_OPTION} MESSAGE] "
            "DRV [CHROOT]",
            file=sys.stderr,
        )
        return 2
    chroot = args[1] if len(args) > 1 else None
    try:
        if refused is not None:
            raise HookError(f"cannot open a recnix session for {args[0]}: {refused}")
        sys.stdout.write(pre_build(args[0], chroot, control_socket))
    except Exception as e:  # any failure must name the build, and fail only this build
        message = " ".join(f"recnix: {e}".split())
        print(message, file=sys.stderr)
        # Nix shows a failing hook's stderr only in the daemon's log, but it
        # quotes an unknown hook command in the error the client sees: this
        # line fails the build with our message.
        sys.stdout.write(message + "\n")
        if chroot:
            poison_sandbox(chroot, message)
        return 0
    return 0


def post_build_main(argv: list[str] | None = None) -> int:
    """Console entry point for nix.conf's ``post-build-hook`` (env DRV_PATH, OUT_PATHS);
    argv = [--control-socket PATH]."""
    control_socket, args = _split_option(sys.argv[1:] if argv is None else argv, SOCKET_OPTION)
    failed, args = _split_option(args, FAILED_OPTION)
    if args:
        print(
            f"usage: recnix post-build-hook [{SOCKET_OPTION} PATH] [{FAILED_OPTION} MESSAGE]",
            file=sys.stderr,
        )
        return 2
    drv_path = os.environ.get("DRV_PATH", "")
    out_paths = os.environ.get("OUT_PATHS", "").split()
    try:
        if failed is not None:
            failure = f"recnix could not finalise {drv_path}: {failed}"
            raise HookError(invalidate_after_failure(drv_path, out_paths, failure))
        for line in post_build(drv_path, out_paths, control_socket):
            print(f"recnix: {line}")
    except Exception as e:
        print(f"recnix post-build hook: {e}", file=sys.stderr)
        return 1
    return 0
