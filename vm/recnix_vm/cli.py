"""``recnix-vm``: build the Debian test guest, boot it, run the recursive-build demo."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .image import (
    DEFAULT_SUITE,
    GUEST_SCENARIOS_DIR,
    ROOTFS_SUITES,
    ImageError,
    build_image,
    cache_dir,
)
from .log import held_back, hold_back, log
from .machine import (
    DEFAULT_MEMORY_MB,
    DEFAULT_SMP,
    KVM_PROBE_TIMEOUT,
    Machine,
    MachineError,
    probe_kvm,
)

DESCRIPTION = """\
QEMU harness for recnix: a Debian guest (Nix from Debian: bookworm 2.8, the
default; trixie 2.26; sid 2.34; lix: Lix 2.95 on trixie, from a prebuilt Lix
tarball, see the README's "Lix"; systemd, nix-daemon, recnix installed from
this working tree as a systemd service), booted with its own kernel under TCG
(KVM only if a probe boot works).

The image is cached in $RECNIX_VM_CACHE (default /var/cache/recnix-vm): the
mmdebstrap rootfs (~2 min, once) and the disk image (seconds, rebuilt when
recnix/, tests/scenarios/ or the templates change). Guests boot from qcow2
overlays and never modify the cached image.
"""

EPILOG = """\
examples:
  recnix-vm build-image            build or reuse the image, print its directory
  recnix-vm run                    root shell (SSH) in a fresh, prepared guest; prints
                                   commands to try; discarded on exit
  recnix-vm run --suite sid --copy-in DIR:/root/x -- sh /root/x/run.sh
                                   run one command in a fresh sid guest; its output, its status
  recnix-vm run --console --keep   serial console instead; keep the overlay
  recnix-vm demo                   a recursive build through recnix in a fresh guest
  recnix-vm demo --feature recursive-nix   the same with Nix's built-in feature
  recnix-vm demo --discard-hook-output     the same with the hook's output dropped (as Lix)
  recnix-vm demo --suite trixie    the demo on Debian 13's Nix 2.26
  recnix-vm demo --suite lix       the demo on Lix 2.95 (trixie; ../shared/lix's tarball)
  recnix-vm demo --remote-builder  the outer build dispatched to a second guest
  recnix-vm probe-kvm              re-run the KVM probe boot and show the verdict
"""


def _add_suite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suite",
        choices=tuple(ROOTFS_SUITES),
        default=DEFAULT_SUITE,
        help="the guest's Debian release, i.e. its Nix: "
        + ", ".join(
            f"{s.name} ({s.nix if s.nix.startswith('Lix') else 'Nix ' + s.nix})"
            for s in ROOTFS_SUITES.values()
        )
        + f"; default {DEFAULT_SUITE}",
    )


def _copy_in_spec(value: str) -> tuple[Path, str]:
    host, sep, guest = value.partition(":")
    if not sep or not host or not guest.startswith("/"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOSTPATH:/GUESTPATH")
    if not Path(host).exists():
        raise argparse.ArgumentTypeError(f"{host}: no such file or directory")
    return Path(host), guest


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    _add_suite_option(p)
    p.add_argument(
        "--accel",
        choices=("auto", "tcg", "kvm"),
        default=None,
        help="accelerator (default: $RECNIX_VM_ACCEL or auto = KVM if the probe works)",
    )
    p.add_argument(
        "--smp",
        type=int,
        default=DEFAULT_SMP,
        help=f"vCPUs (default {DEFAULT_SMP}; under TCG 2 boots twice as fast as 1)",
    )
    p.add_argument(
        "--memory",
        type=int,
        default=DEFAULT_MEMORY_MB,
        metavar="MiB",
        help=f"guest memory (default {DEFAULT_MEMORY_MB})",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="machine state (overlay, console.log, sockets); default: a new "
        "directory under the cache; an existing overlay there is reused",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the state directory (overlay and console log) on exit",
    )
    p.add_argument(
        "--global-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill the guest after this long (default: none for run, 1800 for demo)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recnix-vm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache directory (default: $RECNIX_VM_CACHE or /var/cache/recnix-vm)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser(
        "build-image", help="build or reuse the cached guest image; print its path"
    )
    _add_suite_option(build)

    run = sub.add_parser(
        "run",
        help="interactive root shell in a fresh guest, prepared like the demo's "
        "(Nix bundle and busybox in the store, /root/example.nix; prints what to try), "
        "or (after --) one command: its output and exit status",
    )
    _add_machine_options(run)
    run.add_argument(
        "--copy-in",
        type=_copy_in_spec,
        action="append",
        default=[],
        metavar="HOSTPATH:GUESTPATH",
        help="copy a host file or directory into the guest before the command (repeatable)",
    )
    run.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="run CMD ARGS (as root, by a shell) instead of an interactive shell; "
        "recnix-vm prints its output and exits with its status",
    )
    run.add_argument(
        "--console",
        action="store_true",
        help="use the serial console (pexpect interact, Ctrl-] leaves) instead of SSH",
    )

    demo = sub.add_parser(
        "demo",
        help="boot a guest, build the 'inner' scenario (a build that runs nix-build "
        "inside its sandbox), print its closure and `recnix tree`",
    )
    _add_machine_options(demo)
    demo.add_argument(
        "--feature",
        default="recnix",
        help="requiredSystemFeatures of the outer build: recnix (default), "
        "recnix-readonly or recursive-nix (Nix's built-in, the oracle)",
    )
    demo.add_argument(
        "--verbose",
        action="store_true",
        help="also print every step of the harness (booting, commands run in the guest); "
        "without it they are shown only when something fails",
    )
    demo.add_argument(
        "--discard-hook-output",
        action="store_true",
        help="run the guest's pre-build hook through a wrapper that drops its output, "
        "as Lix 2.93-2.95 does",
    )
    demo.add_argument(
        "--remote-builder",
        action="store_true",
        help="two guests on a private network: the client builds the outer build "
        "on the builder's store (nix build --store ssh-ng://builder), copies the "
        "closure back and shows it (see README, 'Distributed builds')",
    )

    sub.add_parser(
        "probe-kvm",
        help=f"boot the guest kernel under KVM ({KVM_PROBE_TIMEOUT:.0f} s "
        "limit) and record whether KVM works",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``recnix-vm``."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # tear the guest down on SIGTERM too
    if args.cache:
        os.environ["RECNIX_VM_CACHE"] = str(args.cache)
    try:
        if args.command == "build-image":
            image = build_image(suite=args.suite)
            print(image.directory)
            return 0
        if args.command == "probe-kvm":
            image = build_image()
            works, reason = probe_kvm(image)
            (cache_dir() / "kvm-probe.json").unlink(missing_ok=True)
            print(f"KVM {'works' if works else 'does not work'}: {reason}")
            return 0
        if args.command == "run":
            return _run(args)
        if args.command == "demo":
            return _demo(args)
    except (ImageError, MachineError, TimeoutError) as e:
        print(f"recnix-vm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _machine(args: argparse.Namespace, prefix: str, global_timeout: float | None) -> Machine:
    image = build_image(suite=args.suite)
    state = args.state_dir
    if state is None:
        runs = cache_dir() / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        state = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=runs))
    return Machine(
        image,
        state,
        prefix,
        memory_mb=args.memory,
        smp=args.smp,
        accel=args.accel,
        global_timeout=args.global_timeout or global_timeout,
    )


def _finish(machine: Machine, keep: bool) -> None:
    if machine.is_running:
        machine.shutdown(timeout=60)
    machine.close()
    if keep:
        log(f"kept {machine.state_dir} (overlay.qcow2, console.log)")
    else:
        shutil.rmtree(machine.state_dir, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    from .guestprep import banner, prepare_guest

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if args.copy_in and not argv:
        raise MachineError("--copy-in needs a command: recnix-vm run --copy-in A:B -- CMD ...")
    machine = _machine(args, "run", None)
    try:
        machine.start()
        if argv:
            return _run_command(machine, args.copy_in, argv)
        prepared = prepare_guest(machine)
        sys.stdout.write("\n" + banner(prepared) + "\n")
        sys.stdout.flush()
        if args.console or shutil.which("ssh") is None:
            print("serial console: press Enter for a prompt, Ctrl-] to leave", file=sys.stderr)
            machine.interact()
            return 0
        known_hosts = machine.state_dir / "known_hosts"
        host_key = " ".join(machine.image.ssh_host_key.read_text().split()[:2])
        known_hosts.write_text(f"[127.0.0.1]:{machine.ssh_port} {host_key}\n")
        return subprocess.call([
            "ssh", "-t", "-p", str(machine.ssh_port), "-i", str(machine.image.ssh_key),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "root@127.0.0.1",
        ])  # fmt: skip
    finally:
        _finish(machine, args.keep)


def _run_command(machine: Machine, copy_in: list[tuple[Path, str]], argv: list[str]) -> int:
    """Copy files in, run ``argv`` in the guest; print its output; return its exit status."""
    for host, guest in copy_in:
        machine.copy_to(host, guest)
    command = argv[0] if len(argv) == 1 else shlex.join(argv)
    rc, out, err = machine.execute(command, timeout=None)
    sys.stdout.write(out)
    sys.stdout.flush()
    sys.stderr.write(err)
    return rc


NEXT_STEPS = """\
Try next:
  recnix-vm run                            a root shell in a fresh guest: /root/example.nix
                                           is a recursive build ready to change and build
  recnix-vm demo --feature recursive-nix   the same build with Nix's built-in recursive-nix
  recnix-vm demo --suite lix               the demo on Lix 2.95 (or --suite trixie, sid)
"""


def _demo(args: argparse.Namespace) -> int:
    if args.remote_builder:
        from .remote_demo import demo_remote

        return demo_remote(
            memory_mb=args.memory,
            smp=args.smp,
            accel=args.accel,
            global_timeout=args.global_timeout or 2400,
            keep=args.keep,
            state_dir=args.state_dir,
        )
    if not args.verbose:
        hold_back()  # the harness's own steps: shown only if something fails
    try:
        status = _demo_story(args)
    except BaseException:
        _show_held_back()
        raise
    if status != 0:
        _show_held_back()
    return status


def _show_held_back() -> None:
    lines = held_back()
    if lines:
        print("\nwhat the harness did (last 60 steps):", file=sys.stderr)
        print("\n".join(lines[-60:]), file=sys.stderr)


def _demo_story(args: argparse.Namespace) -> int:
    from .guestnix import bundle_nix_in_guest, discard_hook_output, scenario_runner
    from .guestprep import wait_for_recnix

    say = functools.partial(print, flush=True)
    with_recnix = args.feature.startswith("recnix")
    say(
        "recnix demo: a Nix build that calls nix-build inside its sandbox.\n\n"
        "1. A fresh Debian guest under QEMU (its disk image is built once, then cached),\n"
        "   with its distribution's Nix, nix-daemon under systemd, and recnix set up as\n"
        "   `recnix setup` sets up a host: recnix.service beside nix-daemon, nix.conf's\n"
        "   hooks pointing at recnix."
    )
    started = time.monotonic()
    machine = _machine(args, "demo", 1800)
    try:
        machine.start()
        if with_recnix:
            wait_for_recnix(machine)
        if args.discard_hook_output:
            discard_hook_output(machine)
        version = machine.succeed("nix --version").strip().splitlines()[0]  # Lix: more lines
        suite = machine.image.suite
        guest = "Debian trixie with Lix" if suite == "lix" else f"Debian {suite}"
        say(f"   Up in {time.monotonic() - started:.0f} s: {guest}, {version}.\n")
        busybox, nix = bundle_nix_in_guest(machine)
        runner = scenario_runner(machine, busybox, nix)
        say(
            f"2. The outer build ({GUEST_SCENARIOS_DIR}/inner.nix) requires the system feature\n"
            f'   "{args.feature}". '
            + (
                "recnix's pre-build hook gives its sandbox a nix-daemon socket of its\n"
                "   own, restricted to the build's inputs and what it adds or builds itself.\n"
                if with_recnix
                else "Nix's built-in recursive-nix gives its sandbox a socket.\n"
            )
            + "   Inside, the builder writes generated.nix and runs `nix-build generated.nix`:\n"
            "   a nested build, whose output the outer output refers to. Building (a minute\n"
            "   or two under TCG); nix-build's log as it comes (the nested build's log is\n"
            "   part of the outer one's):"
        )
        start = time.monotonic()
        argv = runner.build_argv("inner", args.feature, f"demo-{time.time_ns()}")
        rc, stdout, stderr = machine.execute(
            shlex.join(["env", "NIX_REMOTE=daemon", *argv]),
            1800,
            on_stderr=lambda line: say(f"   | {line}"),
        )
        elapsed = time.monotonic() - start
        outcome = runner.outcome(rc, stdout, stderr)
        if not outcome.ok:
            say(f"\nThe outer build failed ({elapsed:.1f} s):\n{outcome.describe()}")
            _, status, _ = machine.execute("systemctl status --no-pager -l recnix.service 2>&1")
            say(f"recnix.service:\n{status}")
            return 1
        out = outcome.out_path
        say(
            f"\n3. Built in {elapsed:.1f} s.\n"
            f"   outer output:  {out}\n"
            f"   inner output:  {runner.read(f'{out}/inner-path').strip()}\n"
            f"   inner content: {runner.read(f'{out}/inner-content').strip()}\n"
        )
        say(
            f"4. Its closure (nix-store -qR {out}):\n"
            "   the inner output is in it. Nix looks in an output only for the paths the build\n"
            "   had as inputs, and the inner output was not one of them: recnix's post-build\n"
            "   hook registered the reference before the build counted as done."
        )
        for path in sorted(runner.closure(out)):
            say(f"   {path}")
        if with_recnix:
            rc, tree, err = machine.execute(f"recnix tree {out}")
            say(f"\n5. recnix tree {out}: the builds behind it, from recnix's audit log.")
            for line in (tree + err).rstrip().splitlines():
                say(f"   {line}")
            if rc != 0:
                return rc
        say("\n" + NEXT_STEPS)
        return 0
    finally:
        _finish(machine, args.keep)


if __name__ == "__main__":
    sys.exit(main())
