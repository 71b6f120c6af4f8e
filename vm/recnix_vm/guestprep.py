"""Get a booted guest ready for a person to experiment in (``recnix-vm run``).

``prepare_guest(machine)`` does what the demo does before its build (wait for
the recnix service, put busybox and the Nix bundle into the store), then
exports their store paths for login shells (``$RECNIX_NIX``,
``$RECNIX_BUSYBOX`` in ``/etc/profile.d/recnix.sh``) and writes a ready
recursive build to ``/root/example.nix``. ``banner(prepared)`` is the text
``recnix-vm run`` prints: the commands to try, each of which works as printed
in the guest's root shell (tests/vm/test_run.py runs them).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .guestnix import bundle_nix_in_guest

if TYPE_CHECKING:
    from .machine import Machine

PROFILE_SCRIPT = "/etc/profile.d/recnix.sh"
EXAMPLE_PATH = "/root/example.nix"
SERVICE_TIMEOUT = 120.0

EXAMPLE_TEMPLATE = r"""# A recursive build: its builder runs nix-build and nix-store --add inside
# its sandbox, through the recnix session the pre-build hook opened for it.
#   nix-build example.nix && nix-store -qR result && recnix tree result
# The defaults are this guest's $RECNIX_NIX and $RECNIX_BUSYBOX.
{ nix ? "@NIX@", busybox ? "@BUSYBOX@" }:
let
  bb = builtins.storePath busybox;
  nixBundle = builtins.storePath nix;
in
derivation {
  name = "example-outer";
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  # Opt in; "recnix-readonly" would allow queries over the inputs only.
  requiredSystemFeatures = [ "recnix" ];
  PATH = "${bb}/bin:${nixBundle}/bin";
  args = [ "-c" ''
    set -e
    cat > inner.nix <<'EOF'
    derivation {
      name = "example-inner";
      system = "${builtins.currentSystem}";
      builder = "''${builtins.storePath "${bb}"}/bin/sh";
      args = [ "-c" "echo built inside the outer build > $out" ];
    }
    EOF
    echo "a file the outer build added to the store" > note.txt
    mkdir "$out"
    ln -s "$(nix-build --no-out-link inner.nix)" "$out/inner"
    ln -s "$(nix-store --add note.txt)" "$out/note"
  '' ];
}
"""

PROFILE_TEMPLATE = """\
# recnix-vm run: store paths for derivations that run Nix inside their sandbox
# (written by recnix_vm.guestprep).
export RECNIX_NIX={nix}
export RECNIX_BUSYBOX={busybox}
# Build through the nix-daemon, as a user's builds do (root would otherwise
# use the store directly).
export NIX_REMOTE=daemon
"""

# Each entry: (command exactly as the user types it, what it shows).
TRY_COMMANDS = (
    ("nix-build example.nix", "an outer build that runs nix-build and nix-store --add inside"),
    ("nix-store -qR result", "its closure: holds what it built and added from inside"),
    ("recnix tree result", "the nested builds behind it (from the audit log)"),
    ("recnix status", "open sessions (while a recursive build runs)"),
    ("recnix doctor", "checks this machine's setup, then builds a small test"),
    ("journalctl -u recnix --no-pager -n 20", "the recnix service's log"),
)


@dataclass(frozen=True)
class PreparedGuest:
    """Store paths put into the guest, and where the example is."""

    nix: str
    busybox: str
    guest: str = "Debian"  # e.g. "Debian bookworm, nix (Nix) 2.8.0"
    example: str = EXAMPLE_PATH
    profile: str = PROFILE_SCRIPT


def wait_for_recnix(machine: Machine, timeout: float = SERVICE_TIMEOUT) -> None:
    """Wait until recnix.service runs and listens on its control socket."""
    machine.wait_for_unit("recnix.service", timeout=timeout)
    control = guest_control_socket(machine)
    machine.wait_until_succeeds(f"test -S {shlex.quote(control)}", timeout=timeout)


def guest_control_socket(machine: Machine) -> str:
    """The control socket path the guest's recnix is configured with."""
    out = machine.succeed(
        'python3 -c \'import sys; sys.path.insert(0, "/opt/recnix"); '
        "from recnix.config.loader import load_config; print(load_config().control_socket)'"
    )
    return out.strip()


def example_text(nix: str, busybox: str) -> str:
    """``/root/example.nix`` with this guest's store paths as defaults."""
    return EXAMPLE_TEMPLATE.replace("@NIX@", nix).replace("@BUSYBOX@", busybox)


def _write(machine: Machine, path: str, text: str) -> None:
    machine.succeed(f"printf %s {shlex.quote(text)} > {shlex.quote(path)}")


def prepare_guest(machine: Machine) -> PreparedGuest:
    """Make a booted guest ready to experiment in (see the module docstring)."""
    with machine.nested("preparing the guest for experiments"):
        wait_for_recnix(machine)
        busybox, nix = bundle_nix_in_guest(machine)
        _write(machine, PROFILE_SCRIPT, PROFILE_TEMPLATE.format(nix=nix, busybox=busybox))
        _write(machine, EXAMPLE_PATH, example_text(nix, busybox))
        version = machine.succeed("nix --version").strip()
    guest = f"Debian {machine.image.suite}, {version}"
    return PreparedGuest(nix=nix, busybox=busybox, guest=guest)


def banner(prepared: PreparedGuest) -> str:
    """What ``recnix-vm run`` prints before the shell: the commands to try."""
    width = max(len(cmd) for cmd, _ in TRY_COMMANDS)
    lines = [
        f"recnix runs in this guest ({prepared.guest}, recnix.service).",
        "In the root shell below, in /root, try:",
        "",
        *(f"  {cmd:<{width}}  # {what}" for cmd, what in TRY_COMMANDS),
        "",
        f"{prepared.example} is the recursive build; for your own derivations,",
        f"$RECNIX_NIX = {prepared.nix}",
        f"$RECNIX_BUSYBOX = {prepared.busybox}",
        "(set in every login shell). The guest is discarded when you leave (exit).",
    ]
    return "\n".join(lines) + "\n"


def banner_commands(text: str) -> list[str]:
    """The commands a banner lists (for tests: they must work as printed)."""
    return [
        line.split("#", 1)[0].strip()
        for line in text.splitlines()
        if line.startswith("  ") and "#" in line
    ]
