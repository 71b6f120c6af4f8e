"""The recursive-build scenarios shared with the host tier (tests/scenarios/checks.py)
in a Debian 12 guest (Nix 2.8) that runs nix-daemon and the recnix unit under
systemd, configured as the NixOS module configures them.

Each check runs once per Nix version, in the fastest tier that can: the host
tier runs them natively on Nix 2.8, the versions tier on 2.26, 2.34 and Lix,
and this module in a whole machine. What only a machine shows (the unit's
restarts, a killed service, reboots, hard resets) runs on every suite's guest:
tests/vm/test_service_life.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from recnix_vm.machine import Machine

from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner
from tests.vm.guest import boot, build_top_glob, keep, runner_for, start_in_background

pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize("vm_suite", ["bookworm"], indirect=True, scope="module"),
]


@pytest.fixture(scope="module")
def guest(module_machine_factory) -> Iterator[tuple[Machine, ScenarioRunner]]:
    machine = module_machine_factory("scenarios")
    busybox, nix = boot(machine)
    yield machine, runner_for(machine, busybox, nix)


def test_inner_build_and_tree(guest) -> None:
    machine, runner = guest
    out = checks.check_inner(runner, RECNIX)
    tree = machine.succeed(f"NIX_REMOTE=daemon recnix tree {out}")
    assert "-inner.drv" in tree and "-scenario-inner.drv" in tree, tree


def test_add(guest) -> None:
    checks.check_add(guest[1], RECNIX)


def test_deep(guest) -> None:
    checks.check_deep(guest[1], RECNIX)


def test_readonly(guest) -> None:
    checks.check_readonly(guest[1])


def test_denied(guest) -> None:
    machine, runner = guest
    secret_file = f"/root/secret-{fresh_tag()}"
    machine.succeed(f"echo {fresh_tag()} > {secret_file}")
    secret = machine.succeed(f"NIX_REMOTE=daemon nix-store --add {secret_file}").strip()
    checks.check_denied(runner, RECNIX, secret)


def test_fixed_output_refused_by_default(guest) -> None:
    _, runner = guest
    tag = fresh_tag()
    outcome = runner.build("fod", RECNIX, tag, {"innerTag": tag})
    assert outcome.rc != 0 and "allow-fixed-output" in outcome.stderr, outcome.describe()


def test_failure(guest) -> None:
    machine, runner = guest
    checks.check_failure(runner, RECNIX)
    # the watcher ends the failed build's session: no session socket remains
    machine.wait_until_succeeds("test -z \"$(ls /run/recnix | grep '^s-')\"", timeout=30)


@pytest.mark.parametrize("scenario", ["inner", "add", "deep"])
def test_differential_against_builtin(guest, scenario: str) -> None:
    checks.check_differential(guest[1], scenario)


def test_gc_during_and_after_a_nested_build(guest) -> None:
    machine, runner = guest
    tag = fresh_tag()
    argv = runner.build_argv("gc", RECNIX, tag, {"innerTag": tag, "wait": 180})
    log = f"/root/gc-{tag}.log"
    start_in_background(machine, argv, log)
    started = machine.wait_until_succeeds(
        f"ls -d {build_top_glob(machine, 'waiting-inner')}/started", timeout=300
    ).split()[0]
    # a real GC while the nested build waits: what the outer build added survives
    machine.succeed("NIX_REMOTE=daemon nix-collect-garbage")
    machine.succeed(f"touch {started.rsplit('/', 1)[0]}/release")
    machine.wait_until_fails(f"kill -0 $(cat {log}.pid)", timeout=300)
    out = machine.succeed(f"tail -n1 {log}.out").strip()
    assert out.startswith("/nix/store/"), machine.execute(f"cat {log}.err")
    checks.assert_complete_reference(runner, out, "added")
    inner = checks.assert_complete_reference(runner, out, "inner")
    keep(machine, out, f"gc-{tag}")
    machine.succeed("NIX_REMOTE=daemon nix-collect-garbage")
    closure = runner.closure(out)
    assert inner in closure
    for path in closure:
        assert runner.verify_path(path), f"{path} lost after GC"
