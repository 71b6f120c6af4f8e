"""What only a whole machine shows, on the oldest and the newest Debian guest
(bookworm: Nix 2.8, sid: 2.34): recnix's systemd unit restarted between builds and
mid-build, its config changed, the service killed mid-build, a reboot, a hard reset
during a nested build. One guest per suite; the reboot and the hard reset come
last, in it. (Nix 2.26 runs the service's restarts natively in the versions tier,
and the Lix guest, on trixie's systemd, restarts recnix mid-build: test_lix.py.)
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator

import pytest
from recnix_vm.machine import Machine

from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner
from tests.vm.guest import (
    CONSISTENCY,
    RECNIX_CONFIG,
    boot,
    build_top_glob,
    keep,
    restart_mid_build,
    runner_for,
    start_in_background,
)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize("vm_suite", ["bookworm", "sid"], indirect=True, scope="module"),
]


@pytest.fixture(scope="module")
def guest(module_machine_factory) -> Iterator[tuple[Machine, ScenarioRunner]]:
    machine = module_machine_factory("life")
    busybox, nix = boot(machine)
    yield machine, runner_for(machine, busybox, nix)


def test_restart_between_builds(guest) -> None:
    machine, runner = guest
    checks.check_inner(runner, RECNIX)
    machine.succeed("systemctl restart recnix.service")
    machine.wait_for_unit("recnix.service")
    checks.check_inner(runner, RECNIX)


def test_fixed_output_allowed_after_config_change(guest) -> None:
    machine, runner = guest
    original = machine.succeed(f"cat {RECNIX_CONFIG}")
    try:
        machine.succeed(
            "sed -i 's/^allow-fixed-output = false/allow-fixed-output = true/' "
            f"{RECNIX_CONFIG} && grep -q '^allow-fixed-output = true' {RECNIX_CONFIG} "
            "&& systemctl restart recnix.service"
        )
        machine.wait_for_unit("recnix.service")
        checks.check_fod(runner, RECNIX)
    finally:
        machine.succeed(
            f"printf %s {shlex.quote(original)} > {RECNIX_CONFIG} && systemctl restart recnix"
        )
        machine.wait_for_unit("recnix.service")


def test_restart_mid_build_resumes_the_session(guest) -> None:
    """systemctl restart while an outer build waits between nested builds: it succeeds
    (the session is journaled in /run/recnix, which the unit keeps across restarts)."""
    machine, runner = guest
    restart_mid_build(machine, runner)
    assert "resumed" in machine.succeed("journalctl -u recnix.service --no-pager")


def test_killed_mid_build(guest) -> None:
    """recnix killed while a nested build runs: the outer fails fast, the unit comes back."""
    machine, runner = guest
    tag = fresh_tag()
    argv = runner.build_argv("gc", RECNIX, tag, {"innerTag": tag, "wait": 300})
    log = f"/root/kill-{tag}.log"
    start_in_background(machine, argv, log)
    started = f"ls -d {build_top_glob(machine, 'waiting-inner')}/started"
    machine.wait_until_succeeds(started, timeout=300)
    killed_at = time.monotonic()
    machine.succeed("systemctl kill --signal=KILL recnix.service")
    machine.wait_until_fails(f"kill -0 $(cat {log}.pid)", timeout=60)
    assert time.monotonic() - killed_at < 60
    rc, err, _ = machine.execute(f"cat {log}.err")
    assert "waiting-inner" in err or "error" in err, err
    assert machine.execute(f"tail -n1 {log}.out")[1].strip() == "", "the outer build succeeded"
    machine.wait_for_unit("recnix.service", timeout=60)
    checks.check_inner(runner, RECNIX)


# -- reboots and resets (guests of their own) -------------------------------------


# -- reboots and resets: the last tests, in the same guest ---------------------------


def test_reboot_keeps_results(guest) -> None:
    machine, runner = guest
    out = checks.check_inner(runner, RECNIX)
    keep(machine, out, "inner")
    inner = runner.readlink(f"{out}/inner")
    machine.shutdown()
    machine.start()
    machine.wait_for_unit("recnix.service")
    assert runner.verify_path(out)
    assert inner in runner.references(out)
    machine.succeed("NIX_REMOTE=daemon nix-collect-garbage")
    assert runner.read(inner) == "hello from the inner build\n"
    checks.check_add(runner, RECNIX)


def test_hard_reset_during_a_nested_build(guest) -> None:
    """A hard reset while a nested build runs leaves a consistent store.

    Nix 2.8 does not fsync what it adds, so everything written before the
    outer build starts is synced first; what is written afterwards is the
    session's own adds, which recnix makes durable before it uses them when
    ``daemon.fsync-paths = "always"`` (the default follows Nix's own
    ``fsync-store-paths``, off in 2.8).
    """
    machine, runner = guest
    machine.succeed(
        f"sed -i 's/^fsync-paths = .*/fsync-paths = \"always\"/' {RECNIX_CONFIG} && "
        f"grep -q '^fsync-paths = \"always\"' {RECNIX_CONFIG} && systemctl restart recnix"
    )
    machine.wait_until_succeeds("journalctl -u recnix | grep -q 'fsync of session paths on'")
    tag = fresh_tag()
    argv = runner.build_argv("gc", RECNIX, tag, {"innerTag": tag, "wait": 300})
    instantiate = [
        "nix-instantiate" if a == "nix-build" else a for a in argv if a != "--no-out-link"
    ]
    drv = machine.succeed(f"NIX_REMOTE=daemon {shlex.join(instantiate)}").strip()
    machine.succeed("sync")
    machine.succeed(f"NIX_REMOTE=daemon nohup nix-store --realise {drv} > /root/reset.out 2>&1 &")
    started = f"ls -d {build_top_glob(machine, 'waiting-inner')}/started"
    machine.wait_until_succeeds(started, timeout=300)
    machine.reset()  # waits for the guest to boot again
    machine.wait_for_unit("recnix.service")
    verify = machine.succeed("nix-store --verify --check-contents 2>&1")
    assert "error" not in verify.lower() and "modified" not in verify, verify
    # every valid path's references are valid and present
    machine.succeed(f"python3 -c {shlex.quote(CONSISTENCY)}")
    machine.wait_until_succeeds("test -S /run/recnix/control.sock", timeout=60)
    checks.check_inner(runner, RECNIX)
