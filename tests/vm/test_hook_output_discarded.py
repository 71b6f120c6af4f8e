"""The main scenarios in a guest whose Nix drops the pre-build hook's output (issue 15).

Lix 2.93-2.95 runs the pre-build hook but ignores what it prints, so the
``extra-sandbox-paths`` block never reaches it; recnix must put the session's socket
into the build's chroot itself. No Lix here: the guest's Nix (2.8 on bookworm, 2.34 on
sid) gets a pre-build hook that runs recnix's and discards its stdout
(``recnix_vm.guestnix.discard_hook_output``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from recnix_vm.guestnix import discard_hook_output
from recnix_vm.machine import Machine

from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner
from tests.vm.test_scenarios import boot, build_top_glob, runner_for, start_in_background

pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize("vm_suite", ["bookworm", "sid"], indirect=True, scope="module"),
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
    tag = fresh_tag()
    log = f"/root/restart-{tag}"
    start_in_background(machine, runner.build_argv("restart", RECNIX, tag, {"innerTag": tag}), log)
    build_dir = build_top_glob(machine, "scenario-restart")
    machine.wait_until_succeeds(f"ls -d {build_dir}/started", timeout=300)
    machine.succeed("systemctl restart recnix.service")
    machine.wait_for_unit("recnix.service")
    rc, _, _ = machine.execute(f"for d in {build_dir}; do touch $d/release; done")
    assert rc == 0, machine.execute(f"cat {log}.err")[1]
    machine.wait_until_fails(f"kill -0 $(cat {log}.pid)", timeout=300)
    out = machine.execute(f"tail -n1 {log}.out")[1].strip()
    assert out.startswith("/nix/store/"), machine.execute(f"cat {log}.err")[1]
    checks.check_restart_result(runner, out, tag)
