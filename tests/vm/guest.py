"""What the VM tests do with a guest that runs recnix: wait for its services, run the
scenarios in it, start and stop builds in the background (shared by the modules of
tests/vm)."""

from __future__ import annotations

import shlex

from recnix_vm.guestnix import bundle_nix_in_guest, guest_exec
from recnix_vm.image import GUEST_SCENARIOS_DIR
from recnix_vm.machine import Machine

from tests import nixversion
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner

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


def keep(machine: Machine, path: str, name: str) -> None:
    """Make ``path`` a GC root in the guest."""
    machine.succeed(
        f"mkdir -p {RESULT_ROOT} && NIX_REMOTE=daemon nix-store --add-root "
        f"{RESULT_ROOT}/{name} --indirect --realise {shlex.quote(path)}"
    )


def start_in_background(machine, argv: list[str], log: str) -> None:
    """Run ``argv`` in the guest without waiting: output in ``log``.out/.err, pid in .pid."""
    machine.succeed(
        f"NIX_REMOTE=daemon nohup {shlex.join(argv)} > {log}.out 2> {log}.err & echo $! > {log}.pid"
    )


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
