"""``recnix-vm``: build the Debian test guest, boot it, run the recursive-build demo."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .image import GUEST_SCENARIOS_DIR, ImageError, build_image, cache_dir
from .log import log
from .machine import (
    DEFAULT_MEMORY_MB,
    DEFAULT_SMP,
    KVM_PROBE_TIMEOUT,
    Machine,
    MachineError,
    probe_kvm,
)

DESCRIPTION = """\
QEMU harness for recnix: a Debian 12 guest (Nix 2.8 from Debian, systemd,
nix-daemon, recnix installed from this working tree as a systemd service),
booted with its own kernel under TCG (KVM only if a probe boot works).

The image is cached in $RECNIX_VM_CACHE (default /var/cache/recnix-vm): the
mmdebstrap rootfs (~2 min, once) and the disk image (seconds, rebuilt when
recnix/, tests/scenarios/ or the templates change). Guests boot from qcow2
overlays and never modify the cached image.
"""

EPILOG = """\
examples:
  recnix-vm build-image            build or reuse the image, print its directory
  recnix-vm run                    root shell (SSH) in a fresh guest; discarded on exit
  recnix-vm run --console --keep   serial console instead; keep the overlay
  recnix-vm demo                   a recursive build through recnix in a fresh guest
  recnix-vm demo --feature recursive-nix   the same with Nix's built-in feature
  recnix-vm demo --remote-builder  the outer build dispatched to a second guest
  recnix-vm probe-kvm              re-run the KVM probe boot and show the verdict
"""


def _add_machine_options(p: argparse.ArgumentParser) -> None:
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

    sub.add_parser("build-image", help="build or reuse the cached guest image; print its path")

    run = sub.add_parser("run", help="interactive root shell in a fresh guest")
    _add_machine_options(run)
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
            image = build_image()
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
    image = build_image()
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
    machine = _machine(args, "run", None)
    try:
        machine.start()
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


def json_control_socket(machine: Machine) -> str:
    """The control socket path the guest's recnix is configured with."""
    out = machine.succeed(
        'python3 -c \'import sys; sys.path.insert(0, "/opt/recnix"); '
        "from recnix.config import load_config; print(load_config().control_socket)'"
    )
    return out.strip()


def _demo(args: argparse.Namespace) -> int:
    from .guestnix import bundle_nix_in_guest, scenario_runner

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
    machine = _machine(args, "demo", 1800)
    try:
        machine.start()
        if args.feature.startswith("recnix"):
            machine.wait_for_unit("recnix.service", timeout=120)
            control = json_control_socket(machine)
            machine.wait_until_succeeds(f"test -S {control}", timeout=120)
        busybox, nix = bundle_nix_in_guest(machine)
        runner = scenario_runner(machine, busybox, nix)
        with machine.nested(f"nix-build {GUEST_SCENARIOS_DIR}/inner.nix (feature {args.feature})"):
            start = time.monotonic()
            outcome = runner.build("inner", feature=args.feature, tag=f"demo-{time.time_ns()}")
            elapsed = time.monotonic() - start
        if not outcome.ok:
            print(f"the outer build failed ({elapsed:.1f} s):\n{outcome.describe()}")
            _, status, _ = machine.execute("systemctl status --no-pager -l recnix.service 2>&1")
            print(f"recnix.service:\n{status}")
            return 1
        out = outcome.out_path
        print(f"\nouter output ({elapsed:.1f} s): {out}")
        print(f"inner output: {runner.read(f'{out}/inner-path').strip()}")
        print(f"inner content: {runner.read(f'{out}/inner-content').strip()}")
        print(f"\nclosure (nix-store -qR {out}):")
        for path in sorted(runner.closure(out)):
            print(f"  {path}")
        if args.feature.startswith("recnix"):
            rc, tree, err = machine.execute(f"recnix tree {out}")
            print(f"\nrecnix tree {out}:\n{tree}{err}")
            if rc != 0:
                return rc
        return 0
    finally:
        _finish(machine, args.keep)


if __name__ == "__main__":
    sys.exit(main())
