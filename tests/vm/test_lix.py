"""recnix on Lix in a guest (issue 20): the ``lix`` suite's guest is trixie with Lix
2.95 as its system Nix (``recnix_vm.image.install_lix``: Debian's nix-bin purged, Lix's
nix-daemon under nix-setup-systemd's units), recnix's service and nix.conf as the
README sets them up on Lix (`recnix nix-conf` leaves out the build-hook and the
built-in recursive-nix).

Lix 2.93-2.95 drop the pre-build hook's output, so the session socket reaches the
builder only as the file recnix puts into the chroot itself (the path the host tier
emulates on Nix with a discarding wrapper): the main scenarios, a service restart
mid-build (the socket in the chroot replaced by the new service's) and a probe of
how the socket got there run on that path. Without a Lix tarball the module is
skipped with the reason (scripts/build-lix-tarball.sh makes one).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from recnix_vm import lix
from recnix_vm.machine import Machine

from tests import nixversion
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner
from tests.vm.guest import (
    SETUP_DAEMON_DROPIN,
    SETUP_NIX_CONF,
    boot,
    restart_mid_build,
    runner_for,
    setup_example_again_and_undo,
    take_recnix_away,
)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize("vm_suite", ["lix"], indirect=True, scope="module"),
]


@pytest.fixture(scope="module")
def guest(module_machine_factory) -> Iterator[tuple[Machine, ScenarioRunner, str]]:
    try:
        lix.find_tarball(Path(__file__).resolve().parents[2])
    except lix.LixUnavailable as e:
        pytest.skip(f"lix guest: {e}")
    machine = module_machine_factory("lix")
    busybox, nix = boot(machine, "nix-daemon.service")  # Lix's: no socket activation
    yield machine, runner_for(machine, busybox, nix), busybox


def test_lix_is_the_system_nix_and_doctor_agrees(guest) -> None:
    machine, _, _ = guest
    version = nixversion.parse(machine.succeed("nix --version"))
    assert version.lix and version[:2] == (2, 95), version
    assert machine.succeed("command -v nix nix-daemon nix-build").split() == [
        "/usr/local/bin/nix",
        "/usr/local/bin/nix-daemon",
        "/usr/local/bin/nix-build",
    ]
    assert machine.execute("ls /usr/bin/nix*")[0] != 0  # no other Nix on PATH
    # the daemon that answers is Lix's, started by systemd
    assert "2.95" in machine.succeed("NIX_REMOTE=daemon nix store ping 2>&1")
    conf = machine.succeed("cat /etc/nix/nix.conf")
    assert "recnix-build-hook" not in conf and "recursive-nix" not in conf, conf
    doctor = machine.succeed("recnix doctor --no-build")
    lines = {line.split()[1]: line for line in doctor.splitlines()[:-1] if line.split()}
    assert not [line for line in lines.values() if line.startswith("FAIL")], doctor
    assert lines["nix-version"].startswith("ok") and "Lix 2.95" in lines["nix-version"], doctor
    assert lines["build-hook"].startswith("ok"), doctor
    assert lines["daemon-socket"].startswith("ok"), doctor


def test_main_scenarios(guest) -> None:
    machine, runner, _ = guest
    out = checks.check_inner(runner, RECNIX)
    tree = machine.succeed(f"NIX_REMOTE=daemon recnix tree {out}")
    assert "-inner.drv" in tree and "-scenario-inner.drv" in tree, tree
    checks.check_add(runner, RECNIX)
    checks.check_deep(runner, RECNIX)
    checks.check_readonly(runner)
    checks.check_failure(runner, RECNIX)
    secret_file = f"/root/secret-{fresh_tag()}"
    machine.succeed(f"echo {fresh_tag()} > {secret_file}")
    secret = machine.succeed(f"NIX_REMOTE=daemon nix-store --add {secret_file}").strip()
    checks.check_denied(runner, RECNIX, secret)


# fails without a socket; else how many mounts name daemon-socket (Nix's bind mount: 1)
PROBE_SCRIPT = (
    "test -S /nix/var/nix/daemon-socket/socket || exit 1; "
    "grep -c daemon-socket /proc/self/mountinfo > $out; test -s $out"
)
PROBE = """
let bb = builtins.storePath "{busybox}"; in
derivation {{
  name = "lix-socket-probe"; system = builtins.currentSystem; tag = "{tag}";
  builder = "${{bb}}/bin/sh"; requiredSystemFeatures = [ "recnix" ];
  PATH = "${{bb}}/bin"; args = [ "-c" "{script}" ];
}}
"""


def test_the_socket_is_the_file_recnix_put_into_the_chroot(guest) -> None:
    """Lix drops the hook's extra-sandbox-paths: no mount brings the session's socket
    (as Nix's bind mount would); the socket file recnix placed in the chroot is there."""
    machine, runner, busybox = guest
    expr = f"/root/probe-{fresh_tag()}.nix"
    text = PROBE.format(busybox=busybox, tag=fresh_tag(), script=PROBE_SCRIPT)
    machine.succeed(f"printf %s {shlex.quote(text)} > {expr}")
    out = machine.succeed(f"NIX_REMOTE=daemon nix-build --no-out-link {expr}").strip()
    assert runner.read(out).strip() == "0", runner.read(out)


def test_restart_mid_build_resumes_the_session(guest) -> None:
    """systemctl restart while an outer build waits between nested builds: the socket
    in the chroot is replaced by the restarted service's, and the build finishes."""
    machine, runner, _ = guest
    restart_mid_build(machine, runner)


# A Lix host's nix.conf before recnix (last: the guest is left without recnix).
LIX_NIX_CONF = """\
build-users-group = nixbld
sandbox = true
substituters =
"""


def test_setup_doctor_example_again_and_undo_on_lix(guest, recnix_wheel: Path) -> None:
    """`recnix setup` on a Lix host: no build-hook in what it writes (Lix keeps its own),
    doctor all ok, the README's example builds, --undo restores every file."""
    machine, runner, busybox = guest
    take_recnix_away(machine, LIX_NIX_CONF, recnix_wheel)
    _, written = setup_example_again_and_undo(machine, busybox, runner.nix)
    conf = written[SETUP_NIX_CONF]
    assert "pre-build-hook = " in conf, conf
    assert not re.search(r"^build-hook", conf, re.M), conf  # Lix keeps its own
    assert "build-hook" not in written[SETUP_DAEMON_DROPIN], written
