"""``recnix`` command line: the daemon, the hooks, and tools around them."""

from __future__ import annotations

import sys

from recnix import __version__

# Not typing.TYPE_CHECKING: importing typing costs every hook call ~3 ms.
TYPE_CHECKING = False

if TYPE_CHECKING:
    import argparse

SETUP_HELP = """\
Set up this host for recursive builds: Nix or Lix 2.8+, systemd, not NixOS (use
the NixOS module there). As root:

  - /etc/nix/recnix.conf: recnix's nix.conf lines (recnix nix-conf), and one
    `!include /etc/nix/recnix.conf` appended to /etc/nix/nix.conf;
  - /etc/recnix/hooks.env and a nix-daemon drop-in that reads it (on Nix
    2.25-2.33 also `--option build-hook` on nix-daemon's command line);
  - /etc/systemd/system/recnix.service, hardened as the NixOS module's unit;
  - then systemctl daemon-reload, enable and (re)start recnix.service, restart
    nix-daemon, and run recnix doctor.

A second run changes nothing when nothing differs. Every original file is kept
in /var/lib/recnix/setup first: --undo puts each back byte for byte and stops
recnix.service. Refused (with the reason) on NixOS, with an unparsable
nix.conf, with the sandbox off on nix-daemon's command line, with a pre- or
post-build hook of someone else's, or with Nix older than 2.8. A nix.conf
`sandbox = false` (Debian's default) is overridden, with a note. Without
systemd it prints the steps and exits 1.
"""

DOCTOR_BUILD_TIMEOUT = 600.0  # seconds `recnix doctor` (and setup's run of it) gives its build

CONTROL_SOCKET_HELP = (
    "talk to the service at PATH without reading the configuration (then no further "
    "hooks are chained); the hook scripts pass it when they found it in the config file"
)


def _cmd_daemon(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from recnix.config.loader import load_config
    from recnix.daemon.service import Service

    config = load_config(args.config)
    logging.basicConfig(
        level=getattr(logging, config.settings.daemon.log_level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from recnix.store.aio import loop_factory

    factory = loop_factory()
    logging.getLogger("recnix.daemon.service").info(
        "event loop: %s", "uvloop" if factory is not None else "asyncio"
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(Service(config).run())
    return 0


def _socket_option(args: argparse.Namespace) -> list[str]:
    return ["--control-socket", args.control_socket] if args.control_socket else []


def _cmd_pre_build_hook(args: argparse.Namespace) -> int:
    from recnix.hooks.prepost import pre_build_main

    chroot = [args.chroot] if args.chroot else []
    return pre_build_main([*_socket_option(args), args.drv, *chroot])


def _cmd_post_build_hook(args: argparse.Namespace) -> int:
    from recnix.hooks.prepost import post_build_main

    return post_build_main(_socket_option(args))


def _cmd_tree(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    from recnix.config.loader import load_config
    from recnix.daemon.audit import annotate_where, build_tree, read_events, render_tree

    config = load_config(args.config)
    audit = args.audit_log or config.settings.daemon.audit_log
    if not audit or not Path(audit).exists():
        print(f"recnix tree: no audit log at {audit!r} (daemon.audit-log)", file=sys.stderr)
        return 1
    target = args.path
    if not target.endswith(".drv"):
        from recnix.store.storeenv import client_env

        proc = subprocess.run(
            ["nix-store", "--query", "--deriver", target],
            capture_output=True,
            text=True,
            check=False,
            env=client_env(),
        )
        deriver = proc.stdout.strip()
        if proc.returncode != 0 or not deriver or deriver == "unknown-deriver":
            print(
                f"recnix tree: cannot find the derivation of {target}: "
                f"{proc.stderr.strip() or 'unknown deriver'}",
                file=sys.stderr,
            )
            return 1
        target = deriver
    tree = build_tree(list(read_events(Path(audit))), target)
    annotate_where(tree, _read_build_log)
    sys.stdout.write(render_tree(tree))
    return 0


def _read_build_log(drv: str) -> str | None:
    """``nix-store --read-log``: the stored build log of ``drv``, None if there is none."""
    import subprocess

    from recnix.store.storeenv import client_env

    proc = subprocess.run(
        ["nix-store", "--read-log", drv],
        capture_output=True,
        text=True,
        check=False,
        env=client_env(),
    )
    return proc.stdout if proc.returncode == 0 else None


def _cmd_bundle_nix(args: argparse.Namespace) -> int:
    from recnix.cli.bundle import BundleError, bundle_nix

    try:
        print(bundle_nix(gc_root=args.add_root, nix_binary=args.nix))
    except BundleError as e:
        print(f"recnix bundle-nix: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_busybox(args: argparse.Namespace) -> int:
    from recnix.cli.bundle import busybox_store_path

    print(busybox_store_path())
    return 0


def _cmd_nix_conf(args: argparse.Namespace) -> int:
    import os

    from recnix.config.loader import load_config, render_nix_conf

    config = load_config(args.config)
    if args.daemon_env:
        from recnix.config.loader import hook_environment

        entry = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hooks", "entry.py"
        )
        env = hook_environment(config.raw, sys.executable, entry)
        sys.stdout.write("".join(f"{key}={value}\n" for key, value in env.items()))
        return 0
    lix = args.lix
    if lix is None:
        lix = _host_is_lix(args.nix)
    try:
        pre = args.pre_build_hook or _program("recnix-pre-build-hook", "--pre-build-hook")
        post = args.post_build_hook or _program("recnix-post-build-hook", "--post-build-hook")
        build = None if lix else args.build_hook or _program("recnix-build-hook", "--build-hook")
    except LookupError as e:
        print(f"recnix nix-conf: {e}", file=sys.stderr)
        return 1
    relative = [path for path in (pre, post, build) if path and not os.path.isabs(path)]
    if relative:
        print(
            f"recnix nix-conf: {relative[0]} is not an absolute path (Nix refuses to start "
            "with a relative build-hook, and runs hooks from any directory)",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(render_nix_conf(config.raw, pre, post, lix=lix, build_hook=build))
    return 0


def _program(name: str, option: str) -> str:
    """The absolute path of recnix's ``name`` (nix.conf needs one: Nix refuses to start
    with a relative build-hook); LookupError saying which option gives it."""
    from recnix.cli.installpaths import installed_program

    found = installed_program(name)
    if found is None:
        raise LookupError(
            f"cannot find {name} beside recnix or on PATH: is recnix installed? "
            f"(or give its path with {option})"
        )
    return found


def _host_is_lix(nix: str | None) -> bool:
    """Whether ``nix`` (default: the ``nix`` on PATH) is Lix, from its ``--version``."""
    import shutil

    from recnix.cli.nixversion import NixVersionError, nix_version

    binary = nix or shutil.which("nix")
    if binary is None:
        print(
            "recnix nix-conf: no nix on PATH; assuming Nix, not Lix (use --lix or --nix PATH)",
            file=sys.stderr,
        )
        return False
    try:
        return nix_version(binary).is_lix
    except (NixVersionError, OSError) as e:
        print(f"recnix nix-conf: {e}; assuming Nix, not Lix (use --lix)", file=sys.stderr)
        return False


def _cmd_setup(args: argparse.Namespace) -> int:
    import argparse
    import os
    from pathlib import Path

    from recnix.cli import setup
    from recnix.config.loader import load_config

    config = load_config(args.config)
    root = Path("/")
    if not args.dry_run and os.geteuid() != 0:
        print(
            "recnix setup: run it as root (it writes /etc and restarts services)", file=sys.stderr
        )
        return 1
    try:
        if args.undo:
            setup.undo(root)
            return 0
        host = setup.gather(config, root)
        nix_conf = host.path(setup.NIX_CONF)
        wanted = setup.plan(host, nix_conf.read_text() if nix_conf.exists() else "")
    except setup.SetupRefused as e:
        print(f"recnix setup: refused: {e}", file=sys.stderr)
        return 1
    for note in wanted.notes:
        print(f"recnix setup: note: {note}")
    if args.dry_run:
        print("recnix setup --dry-run: nothing is changed; setup would write:\n")
        print(setup.describe(wanted))
        return 0
    if not host.systemd:
        print(
            "recnix setup: this host does not run systemd, so nothing was changed; "
            "these are the files and commands to adapt by hand:\n",
            file=sys.stderr,
        )
        print(setup.describe(wanted), file=sys.stderr)
        return 1
    try:
        setup.apply(host, wanted)
    except setup.SetupRefused as e:
        print(f"recnix setup: {e}", file=sys.stderr)
        return 1
    print("recnix setup: recnix doctor says:")
    doctor_args = argparse.Namespace(
        config=args.config, json=False, no_build=args.no_build, nix=None, busybox=None,
        timeout=DOCTOR_BUILD_TIMEOUT,
    )  # fmt: skip
    return _cmd_doctor(doctor_args)


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import time

    from recnix.cli.status import render_failures, render_status
    from recnix.config.loader import load_config
    from recnix.hooks import control

    config = load_config(args.config)
    try:
        reply = control.request(config.control_socket, {"op": "status"}, timeout=10)
    except control.ControlError as e:
        print(f"recnix status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply["sessions"], indent=2))
    else:
        sys.stdout.write(render_status(reply["sessions"], time.time()))
        sys.stdout.write(render_failures(reply.get("failures", [])))
    return 0


DOCTOR_HELP = """\
Check this machine's setup for recursive builds, one line per check, with what
to do when one fails: the Nix version and protocol, nix.conf as the daemon
reads it ($NIX_CONF_DIR/nix.conf, else /etc/nix/nix.conf: sandbox,
sandbox-fallback, both hooks, system features, build users), the nix-daemon
that daemon.upstream names, the recnix service on its control socket, user
namespaces and open_tree/move_mount (else recnix falls back to hard links),
the state and gc-roots directories; then a real check, a small opted-in build
that runs `nix-store --add` in its sandbox.

Exit status 0 when nothing FAILed (warnings pass), 1 otherwise. It changes
nothing, except that the build check adds to the Nix store what it needs
(busybox and the Nix bundle, as `recnix busybox` / `recnix bundle-nix` do,
unless --busybox/--nix or $RECNIX_BUSYBOX/$RECNIX_NIX give them) and its own
small unrooted output. Run it as root (the control socket is root-only).
"""


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json
    import os

    from recnix.cli import doctor
    from recnix.config.loader import load_config

    config = load_config(args.config)
    results = doctor.run_checks(doctor.gather(config))
    if not args.json:
        sys.stdout.writelines(doctor.render_line(r) for r in results)
        sys.stdout.flush()  # the build check takes a while
    if args.no_build:
        build = doctor.Result("build", doctor.SKIP, "test build skipped (--no-build)")
    else:
        build = doctor.build_check(
            nix=args.nix or os.environ.get("RECNIX_NIX") or None,
            busybox=args.busybox or os.environ.get("RECNIX_BUSYBOX") or None,
            timeout=args.timeout,
        )
    results.append(build)
    if args.json:
        print(json.dumps(doctor.to_json(results), indent=2))
    else:
        sys.stdout.write(doctor.render_line(build) + doctor.verdict(results))
    return 0 if doctor.passed(results) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of ``recnix``."""
    import argparse  # not at module level: the hooks' fast path in main() skips it

    from recnix.config.configdocs import render_daemon_help

    parser = argparse.ArgumentParser(
        prog="recnix",
        description="Recursive Nix as an add-on: Nix builds that call Nix inside their "
        "sandbox, with correct closures, on any Nix >= 2.8.",
        epilog='A derivation opts in with requiredSystemFeatures = [ "recnix" ] '
        '(or "recnix-readonly"). Run `recnix COMMAND --help` for details.',
    )
    parser.add_argument("--version", action="version", version=f"recnix {__version__}")
    parser.add_argument("--config", help="configuration file (TOML)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "daemon",
        help="run the recnix service",
        description=render_daemon_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="configuration file (TOML)", default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_daemon)

    p = sub.add_parser(
        "pre-build-hook",
        help="nix.conf pre-build-hook: open a session for an opted-in build",
        description="Called by Nix with DRV and CHROOT for every sandboxed build. Prints "
        "nothing for builds that did not opt in; for opted-in builds, prints the "
        "extra-sandbox-paths block that puts the session socket in the sandbox.",
    )
    p.add_argument("--control-socket", metavar="PATH", help=CONTROL_SOCKET_HELP)
    p.add_argument("drv", metavar="DRV")
    p.add_argument("chroot", metavar="CHROOT", nargs="?")
    p.set_defaults(func=_cmd_pre_build_hook)

    p = sub.add_parser(
        "post-build-hook",
        help="nix.conf post-build-hook: add references to what the build made recursively",
        description="Reads DRV_PATH (and OUT_PATHS, empty on Nix 2.8.0) from the "
        "environment, as Nix sets them.",
    )
    p.add_argument("--control-socket", metavar="PATH", help=CONTROL_SOCKET_HELP)
    p.set_defaults(func=_cmd_post_build_hook)

    p = sub.add_parser(
        "build-hook",
        help="nix.conf build-hook: recursive builds wait for a session before they take a "
        "build user; Nix's build-remote, with recnix's proxy for ssh-ng:// builders",
        description="Serves Nix's build hook protocol: a build that requires recnix waits "
        "(Nix's 'postpone') until the recnix service has a session slot for it, before Nix "
        "takes a build user for it, so that more recursive builds than build users can be "
        "started at once. Builds that may go to remote machines go to Nix's own build hook "
        "(`nix` on PATH as build-remote, or $RECNIX_NIX), with recnix's ssh first on its "
        "PATH: for an ssh-ng:// builder, the .drv closure of a build that requires recnix "
        "goes to the builder before BuildDerivation, and the closure of the outputs built "
        "there comes back to this machine's store (Nix copies back only the outputs). "
        "Anything else goes to the real ssh unchanged. See the README, 'Distributed builds'.",
    )
    p.add_argument("verbosity", nargs="*", help="what Nix passes (its verbosity)")
    p.set_defaults(func=lambda a: __import__("recnix.hooks.buildhook").buildhook.main(a.verbosity))

    p = sub.add_parser(
        "tree",
        help="print the tree of nested builds behind an output or a .drv",
        description="Reads the audit log and prints what a recursive build built and "
        "added inside its sandbox, level by level, and where each nested build ran "
        "as Nix's build log of its parent says ('building ... on <machine>'; "
        "'unknown' when the log does not tell).",
    )
    p.add_argument("path", metavar="PATH-or-DRV")
    p.add_argument("--audit-log", help="audit log to read (default: daemon.audit-log)")
    p.add_argument("--config", help="configuration file (TOML)", default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_tree)

    p = sub.add_parser(
        "bundle-nix",
        help="put a Nix usable inside builds into the store (non-NixOS hosts); print its path",
        description="Copies a nix binary (Nix or Lix), the libraries it needs and wrapper "
        "scripts (nix, nix-build, nix-store, ...) into the store, so a derivation "
        "can use ${bundle}/bin/nix-build in its builder.",
    )
    p.add_argument("--add-root", metavar="LINK", help="also make LINK a GC root of the bundle")
    p.add_argument(
        "--nix",
        metavar="PATH",
        help="the nix binary to bundle (default: nix on PATH, else /usr/bin/nix)",
    )
    p.set_defaults(func=_cmd_bundle_nix)

    p = sub.add_parser(
        "busybox",
        help="put busybox-static into the store as a builder shell; print its path",
    )
    p.set_defaults(func=_cmd_busybox)

    p = sub.add_parser(
        "nix-conf",
        help="print the nix.conf lines a non-NixOS host needs for recnix",
    )
    where = "beside this recnix, else on PATH; absolute"
    p.add_argument("--pre-build-hook", help=f"hook path (default: recnix-pre-build-hook {where})")
    p.add_argument("--post-build-hook", help=f"hook path (default: recnix-post-build-hook {where})")
    p.add_argument(
        "--build-hook",
        help=f"build hook path (default: recnix-build-hook {where}): recursive builds wait "
        "for a session before they take a build user, and Nix's build-remote gets recnix's "
        "proxy for ssh-ng:// builders (left out on Lix)",
    )
    p.add_argument(
        "--lix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the host runs Lix: leave out Nix's built-in recursive-nix (experimental "
        "feature and system feature); default: detected from `nix --version`",
    )
    p.add_argument(
        "--nix", metavar="PATH", help="the nix whose --version tells Lix (default: nix on PATH)"
    )
    p.add_argument(
        "--daemon-env",
        action="store_true",
        help="print instead nix-daemon's environment for the hooks (KEY=VALUE lines, e.g. "
        "for a systemd EnvironmentFile): the config's decisions, so that no build reads it",
    )
    p.add_argument("--config", help="configuration file (TOML)", default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_nix_conf)

    p = sub.add_parser(
        "setup",
        help="set up this (non-NixOS, systemd) host for recursive builds; --undo takes it back",
        description=SETUP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="print every file and command only")
    p.add_argument(
        "--undo",
        action="store_true",
        help="put back every file setup changed, byte for byte, and stop recnix.service",
    )
    p.add_argument("--no-build", action="store_true", help="skip recnix doctor's test build")
    p.add_argument("--config", help="configuration file (TOML)", default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_setup)

    p = sub.add_parser(
        "status",
        help="list the open sessions of the running service",
        description="A table of the service's open sessions: the build, its nesting depth, "
        "age, nested build requests, paths (and bytes) added or built, connections now.",
    )
    p.add_argument("--json", action="store_true", help="the sessions as JSON (for scripts)")
    p.add_argument("--config", help="configuration file (TOML)", default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "doctor",
        help="check this machine's setup for recursive builds (changes nothing)",
        description=DOCTOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="the results as JSON (for scripts)")
    p.add_argument("--no-build", action="store_true", help="skip the test build")
    p.add_argument("--nix", metavar="STORE-PATH", help="Nix for the test build (bin/nix-store)")
    p.add_argument("--busybox", metavar="STORE-PATH", help="busybox for the test build (bin/sh)")
    p.add_argument(
        "--timeout",
        type=float,
        default=DOCTOR_BUILD_TIMEOUT,
        metavar="SECONDS",
        help="test build limit",
    )
    p.add_argument("--config", help="configuration file (TOML)", default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recnix`` console script."""
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] == "build-hook" and "-h" not in args_in and "--help" not in args_in:
        from recnix.hooks import buildhook

        return buildhook.main(args_in[1:])
    if args_in and args_in[0] in ("pre-build-hook", "post-build-hook") and "-h" not in args_in:
        # Nix runs these on the critical path of opted-in builds: skip argparse.
        from recnix.hooks import prepost as hooks

        if args_in[0] == "pre-build-hook":
            return hooks.pre_build_main(args_in[1:])
        return hooks.post_build_main(args_in[1:])
    from recnix.config.loader import ConfigError

    args = build_parser().parse_args(args_in)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"recnix: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
