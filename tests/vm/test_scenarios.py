"""The recursive-build scenarios inside a Debian guest (issue 4), on every suite.

Every test runs on a bookworm (Nix 2.8), a trixie (2.26) and a sid (2.34)
guest (``vm_suite``); what differs between the versions comes from
tests/nixversion.py.

The guest runs nix-daemon and the recnix unit under systemd, configured as the
NixOS module configures them. One guest serves the scenario checks shared with
the host tier (tests/scenarios/checks.py) plus a restart, a config change and a
killed service; reboots and hard resets get guests of their own.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator

import pytest
from recnix_vm.guestnix import bundle_nix_in_guest, guest_exec
from recnix_vm.image import GUEST_SCENARIOS_DIR, SUITES
from recnix_vm.machine import Machine

from tests import nixversion
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner

pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize("vm_suite", list(SUITES), indirect=True, scope="module"),
]

RESULT_ROOT = "/root/results"
RECNIX_CONFIG = "/etc/recnix/config.toml"


def boot(machine: Machine, daemon_unit: str = "nix-daemon.socket") -> tuple[str, str]:
    """Wait for the guest's services (``daemon_unit``: the lix guest's daemon is
    ``nix-daemon.service``); put busybox and the nix bundle in its store."""
    machine.wait_for_unit(daemon_unit)
    machine.wait_for_unit("recnix.service")
    machine.wait_until_succeeds("test -S /run/recnix/control.sock", timeout=60)
    return bundle_nix_in_guest(machine)


def build_top_glob(machine: Machine, drv_name: str) -> str:
    """Glob of the guest's build directory of a build of ``drv_name`` (per Nix version)."""
    v = nixversion.parse(machine.succeed("nix --version"))
    return nixversion.build_top_glob(nixversion.default_build_root(v), drv_name, v)


def runner_for(machine: Machine, busybox: str, nix: str) -> ScenarioRunner:
    return ScenarioRunner(
        guest_exec(machine, via_daemon=True), GUEST_SCENARIOS_DIR, busybox, nix, timeout=600
    )


@pytest.fixture(scope="module")
def guest(module_machine_factory) -> Iterator[tuple[Machine, ScenarioRunner]]:
    machine = module_machine_factory("scenarios")
    busybox, nix = boot(machine)
    yield machine, runner_for(machine, busybox, nix)


def keep(machine: Machine, path: str, name: str) -> None:
    """Make ``path`` a GC root in the guest."""
    machine.succeed(
        f"mkdir -p {RESULT_ROOT} && NIX_REMOTE=daemon nix-store --add-root "
        f"{RESULT_ROOT}/{name} --indirect --realise {shlex.quote(path)}"
    )


# -- the shared scenarios -------------------------------------------------------


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


def start_in_background(machine, argv: list[str], log: str) -> None:
    """Run ``argv`` in the guest without waiting: output in ``log``.out/.err, pid in .pid."""
    machine.succeed(
        f"NIX_REMOTE=daemon nohup {shlex.join(argv)} > {log}.out 2> {log}.err & echo $! > {log}.pid"
    )


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


# -- the service's life ---------------------------------------------------------


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


def restart_mid_build(machine: Machine, runner: ScenarioRunner) -> None:
    """restart.nix in the background; `systemctl restart recnix` while it waits between
    nested builds; release it: it must finish with both builds in its closure."""
    tag = fresh_tag()
    argv = runner.build_argv("restart", RECNIX, tag, {"innerTag": tag})
    log = f"/root/restart-{tag}"
    start_in_background(machine, argv, log)
    build_dir = build_top_glob(machine, "scenario-restart")
    machine.wait_until_succeeds(f"ls -d {build_dir}/started", timeout=300)
    machine.succeed("systemctl restart recnix.service")
    machine.wait_for_unit("recnix.service")
    # (a glob whose last part does not exist yet does not expand: glob the directory)
    rc, _, _ = machine.execute(f"for d in {build_dir}; do touch $d/release; done")
    assert rc == 0, (
        "the outer build ended at the restart:\n"
        + machine.execute(f"cat {log}.err; journalctl -u recnix.service --no-pager | tail -n 30")[1]
    )
    machine.wait_until_fails(f"kill -0 $(cat {log}.pid)", timeout=300)
    out = machine.execute(f"tail -n1 {log}.out")[1].strip()
    assert out.startswith("/nix/store/"), machine.execute(f"cat {log}.err")[1]
    checks.check_restart_result(runner, out, tag)


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


def test_reboot_keeps_results(machine_factory) -> None:
    machine = machine_factory("reboot")
    busybox, nix = boot(machine)
    runner = runner_for(machine, busybox, nix)
    out = checks.check_inner(runner, RECNIX)
    keep(machine, out, "inner")
    inner = runner.readlink(f"{out}/inner")
    machine.shutdown()
    machine.start()
    machine.wait_for_unit("recnix.service")
    runner = runner_for(machine, busybox, nix)
    assert runner.verify_path(out)
    assert inner in runner.references(out)
    machine.succeed("NIX_REMOTE=daemon nix-collect-garbage")
    assert runner.read(inner) == "hello from the inner build\n"
    checks.check_add(runner, RECNIX)


# Every valid path exists, and so does everything it refers to.
CONSISTENCY = """
import json, os, subprocess, sys
data = json.loads(subprocess.run(
    ["nix", "--extra-experimental-features", "nix-command", "path-info", "--all", "--json"],
    check=True, capture_output=True, text=True).stdout)
# Nix 2.8: a list of records; 2.19 on: an object keyed by path
infos = [dict(v, path=k) for k, v in data.items()] if isinstance(data, dict) else data
bad = [f"{i['path']} -> {r}" for i in infos for r in [i["path"], *i.get("references", [])]
       if not os.path.exists(r)]
print(len(infos), "valid paths checked")
sys.exit("\\n".join(bad) or None)
"""


def test_hard_reset_during_a_nested_build(machine_factory) -> None:
    """A hard reset while a nested build runs leaves a consistent store.

    Nix 2.8 does not fsync what it adds, so everything written before the
    outer build starts is synced first; what is written afterwards is the
    session's own adds, which recnix makes durable before it uses them when
    ``daemon.fsync-paths = "always"`` (the default follows Nix's own
    ``fsync-store-paths``, off in 2.8).
    """
    machine = machine_factory("reset")
    busybox, nix = boot(machine)
    machine.succeed(
        f"sed -i 's/^fsync-paths = .*/fsync-paths = \"always\"/' {RECNIX_CONFIG} && "
        f"grep -q '^fsync-paths = \"always\"' {RECNIX_CONFIG} && systemctl restart recnix"
    )
    machine.wait_until_succeeds("journalctl -u recnix | grep -q 'fsync of session paths on'")
    runner = runner_for(machine, busybox, nix)
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
    since = machine.console_offset()
    machine.reset()
    machine.wait_for_boot(since=since)
    machine.wait_for_unit("recnix.service")
    verify = machine.succeed("nix-store --verify --check-contents 2>&1")
    assert "error" not in verify.lower() and "modified" not in verify, verify
    # every valid path's references are valid and present
    machine.succeed(f"python3 -c {shlex.quote(CONSISTENCY)}")
    machine.wait_until_succeeds("test -S /run/recnix/control.sock", timeout=60)
    checks.check_inner(runner_for(machine, busybox, nix), RECNIX)
