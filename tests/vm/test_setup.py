"""`recnix setup` for real, in bookworm (Nix 2.8), trixie (2.26) and sid (2.34) guests
taken back to what a Debian host has before recnix: Debian's nix.conf (with a few site
lines), no recnix unit, drop-in or config, and recnix installed from its wheel as pipx
would (tests/vm/guest.py). (Lix: the last test of test_lix.py.)

setup → doctor all ok → the README's example builds with its inner output in the
closure → setup again changes nothing → setup --undo → every file as before (by
hash) and recnix's unit gone.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from recnix_vm.machine import Machine

from tests.host.test_readme import readme_block
from tests.vm.guest import (
    SETUP_DAEMON_DROPIN,
    SETUP_NIX_CONF,
    boot,
    setup_example_again_and_undo,
    setup_fingerprint,
    take_recnix_away,
)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize(
        "vm_suite", ["bookworm", "trixie", "sid"], indirect=True, scope="module"
    ),
]

# Each suite's /etc/nix/nix.conf (nix-setup-systemd's conffile), then lines a site adds.
SITE_LINES = "build-users-group = nixbld\nsubstituters =\n"
DEBIAN_NIX_CONF = {
    "bookworm": """\
# see https://nixos.org/nix/manual/#sec-conf-file

# So far the sandbox feature does not seem to work on Debian:
# https://github.com/NixOS/nixpkgs/pull/47794#issuecomment-429575989
sandbox = false
"""
    + SITE_LINES,
    "trixie": """\
# see https://nixos.org/manual/nix/stable/command-ref/conf-file

sandbox = true
"""
    + SITE_LINES,
}
DEBIAN_NIX_CONF["sid"] = DEBIAN_NIX_CONF["trixie"]  # the same conffile


@pytest.fixture(scope="module")
def debian_host(
    module_machine_factory, vm_suite: str, recnix_wheel: Path
) -> Iterator[tuple[Machine, str, str]]:
    """The guest with only Debian's Nix and the recnix wheel (recnix's setup taken
    away); yields (machine, busybox, nix bundle)."""
    machine = module_machine_factory("setup")
    busybox, nix = boot(machine)
    take_recnix_away(machine, DEBIAN_NIX_CONF[vm_suite], recnix_wheel)
    yield machine, busybox, nix


def test_setup_doctor_example_again_and_undo(debian_host, vm_suite: str) -> None:
    machine, busybox, nix = debian_host
    out, written = setup_example_again_and_undo(machine, busybox, nix)
    if "sandbox = false" in DEBIAN_NIX_CONF[vm_suite]:
        assert "sets sandbox = false (Debian's nix.conf does)" in out
    conf, dropin = written[SETUP_NIX_CONF], written[SETUP_DAEMON_DROPIN]
    assert re.search(r"^build-hook = \S+recnix-build-hook$", conf, re.M), conf
    # Nix 2.25-2.33 ignore nix.conf's build-hook: it goes on nix-daemon's command line
    build_hook_arg = r"^ExecStart=.* --option build-hook \S+/recnix-build-hook"
    on_command_line = re.search(build_hook_arg, dropin, re.M)
    assert bool(on_command_line) == (vm_suite == "trixie"), dropin


NO_SANDBOX_DROPIN = "/etc/systemd/system/nix-daemon.service.d/zz-no-sandbox.conf"

# Each refusal a real host can show: (what breaks the host, the command that then runs
# setup, what puts the host back, what setup must say on stderr). Nix older than 2.8 has
# no guest to show it: tests/unit/cli/test_setup.py decides it on given facts.
REFUSALS = {
    "foreign pre-build-hook": (
        "echo 'pre-build-hook = /opt/site-hook' >> /etc/nix/nix.conf",
        "recnix setup",
        None,
        '[hooks] pre-build = ["/opt/site-hook"]',
    ),
    "unparsable nix.conf": (
        "echo 'this is not a setting' >> /etc/nix/nix.conf",
        "recnix setup",
        None,
        "cannot parse /etc/nix/nix.conf line",
    ),
    "NixOS": (
        "touch /etc/NIXOS",
        "recnix setup",
        "rm /etc/NIXOS",
        "this is NixOS: use the NixOS module",
    ),
    "sandbox off on nix-daemon's command line": (
        f"mkdir -p {os.path.dirname(NO_SANDBOX_DROPIN)} && printf "
        "'[Service]\\nExecStart=\\nExecStart=/usr/bin/nix-daemon --option sandbox false\\n' "
        f"> {NO_SANDBOX_DROPIN} && systemctl daemon-reload",
        "recnix setup",
        f"rm {NO_SANDBOX_DROPIN} && systemctl daemon-reload",
        "runs nix-daemon with --option sandbox false",
    ),
    "no systemd": (
        "true",
        # a mount namespace of its own in which /run/systemd is empty
        "unshare -m sh -c 'mount -t tmpfs none /run/systemd && recnix setup'",
        None,
        "this host does not run systemd, so nothing was changed",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_say_why_and_change_nothing(debian_host, case: str) -> None:
    machine, _, _ = debian_host
    breaks, command, restore, says = REFUSALS[case]
    original = machine.succeed("cat /etc/nix/nix.conf")
    before = setup_fingerprint(machine)
    machine.succeed(breaks)
    try:
        rc, out, err = machine.execute(command)
        assert rc == 1, out + err
        assert says in err, err
        machine.fail("test -e /etc/nix/recnix.conf")
    finally:
        machine.succeed(f"printf %s {shlex.quote(original)} > /etc/nix/nix.conf")
        if restore:
            machine.succeed(restore)
    assert setup_fingerprint(machine) == before


def test_by_hand_setup_from_the_readme(debian_host) -> None:
    """The README's "By hand" commands, run verbatim on the Debian host, then its
    bundle-nix/busybox lines and its example: the inner output is in the closure."""
    machine, _, _ = debian_host
    by_hand = readme_block("recnix nix-conf > /etc/nix/recnix.conf")
    tools = readme_block('nix="$(recnix bundle-nix)"')
    example = readme_block("# outer.nix")
    command = example.splitlines()[0].split("—", 1)[1].strip()
    original = machine.succeed("cat /etc/nix/nix.conf")
    machine.succeed(
        f"mkdir -p /root/byhand && printf %s {shlex.quote(example)} > /root/byhand/outer.nix"
    )
    try:
        # the daemon the block starts in the background keeps the log file, not SSH's pipes
        rc, out, err = machine.execute(
            f"bash -e -c {shlex.quote(by_hand)} > /root/byhand/setup.log 2>&1 < /dev/null; "
            "rc=$?; cat /root/byhand/setup.log; exit $rc",
            timeout=300,
        )
        assert rc == 0, out + err
        machine.wait_until_succeeds("recnix status", timeout=60)
        doctor = machine.execute("recnix doctor --no-build 2>&1")[1]
        assert "FAIL" not in doctor, doctor
        result = machine.succeed(
            f"set -e\ncd /root/byhand\n{tools}export NIX_REMOTE=daemon\n{command} 2>&1\n"
            "nix-store -qR result",
            timeout=900,
        )
        assert any(line.endswith("-inner") for line in result.splitlines()), result
    finally:
        machine.execute(
            "pkill -f 'recnix daemon'; rm -rf /etc/nix/recnix.conf /etc/recnix/hooks.env "
            "/etc/systemd/system/nix-daemon.service.d && "
            f"printf %s {shlex.quote(original)} > /etc/nix/nix.conf && "
            "systemctl daemon-reload && systemctl restart nix-daemon.service"
        )
