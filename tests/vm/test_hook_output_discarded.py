"""The main scenarios in a guest whose Nix drops the pre-build hook's output (issue 15).

Lix 2.93-2.95 runs the pre-build hook but ignores what it prints, so the
``extra-sandbox-paths`` block never reaches it; recnix must put the session's socket
into the build's chroot itself. No Lix here: the guest's Nix (2.34, sid) gets a
pre-build hook that runs recnix's and discards its stdout
(``recnix_vm.guestnix.discard_hook_output``). The host and versions tiers run the same
natively on every Nix version (their ``hook_output`` "discarded"), the Lix guest on a
Nix that really drops it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from recnix_vm.guestnix import discard_hook_output
from recnix_vm.machine import Machine

from tests.scenarios import checks
from tests.scenarios.checks import RECNIX
from tests.scenarios.runner import ScenarioRunner
from tests.vm.guest import (
    boot,
    restart_mid_build,
    runner_for,
)

pytestmark = [
    pytest.mark.vm,
    # sid (2.34): the host tier runs the same on 2.8 natively (hook_output "discarded")
    pytest.mark.parametrize("vm_suite", ["sid"], indirect=True, scope="module"),
]


@pytest.fixture(scope="module")
def guest(module_machine_factory) -> Iterator[tuple[Machine, ScenarioRunner]]:
    machine = module_machine_factory("discarded")
    busybox, nix = boot(machine)
    discard_hook_output(machine)
    yield machine, runner_for(machine, busybox, nix)


def test_main_scenarios(guest) -> None:
    machine, runner = guest
    out = checks.check_inner(runner, RECNIX)
    assert "-inner.drv" in machine.succeed(f"NIX_REMOTE=daemon recnix tree {out}")
    checks.check_add(runner, RECNIX)
    checks.check_deep(runner, RECNIX)
    checks.check_readonly(runner)
    checks.check_failure(runner, RECNIX)


def test_restart_mid_build_resumes_the_session(guest) -> None:
    """The chroot's socket is replaced by the restarted service's (atomic rename)."""
    machine, runner = guest
    restart_mid_build(machine, runner)
