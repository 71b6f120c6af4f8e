"""What the VM tests do with a guest that runs recnix: wait for its services, run the
scenarios in it, start and stop builds in the background (shared by the modules of
tests/vm)."""

from __future__ import annotations

import shlex
from pathlib import Path

from recnix_vm.guestnix import bundle_nix_in_guest, guest_exec
from recnix_vm.image import GUEST_SCENARIOS_DIR
from recnix_vm.machine import Machine

from tests import nixversion
from tests.host.test_readme import readme_block
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


# Every file `recnix setup` may touch, and the unit it starts.
SETUP_TOUCHED = (
    "/etc/nix/nix.conf",
    "/etc/nix/recnix.conf",
    "/etc/recnix/hooks.env",
    "/etc/systemd/system/nix-daemon.service.d/recnix.conf",
    "/etc/systemd/system/recnix.service",
)


def setup_fingerprint(machine: Machine) -> str:
    """sha256 and mode of each file setup may touch ("absent" where there is none)."""
    lines = [
        f"{p}: " + machine.succeed(
            f"if [ -e {p} ]; then sha256sum < {p} | cut -d' ' -f1; stat -c %a {p}; "
            "else echo absent; fi"
        ).replace("\n", " ").strip()
        for p in SETUP_TOUCHED
    ]  # fmt: skip
    return "\n".join(lines)


# Where the setup tests install the recnix wheel in a guest: a venv of its own, its
# `recnix` linked into /usr/local/bin (what pipx does with ~/.local/bin).
WHEEL_VENV = "/opt/recnix-venv"


def take_recnix_away(machine: Machine, nix_conf: str, wheel: Path) -> None:
    """Take the guest back to a host before recnix, with only its distribution's Nix and
    recnix installed from ``wheel``: no recnix unit, drop-in, environment file or config,
    the image's own recnix (sources, wrappers, hooks) gone, ``nix_conf`` as
    /etc/nix/nix.conf."""
    machine.succeed(
        "systemctl disable --now recnix.service && rm /etc/systemd/system/recnix.service "
        "&& rm -f /etc/systemd/system/nix-daemon.service.d/recnix.conf "
        "&& rm -rf /etc/recnix /opt/recnix /usr/local/bin/recnix /usr/local/bin/recnix-*hook "
        f"&& printf %s {shlex.quote(nix_conf)} > /etc/nix/nix.conf "
        "&& chmod 644 /etc/nix/nix.conf "
        "&& systemctl daemon-reload && systemctl restart nix-daemon.service"
    )
    machine.copy_to(wheel, f"/root/{wheel.name}")
    machine.succeed(
        f"python3 -m venv {WHEEL_VENV} "
        f"&& {WHEEL_VENV}/bin/pip install -q --no-deps --no-index /root/{wheel.name} "
        f"&& ln -s {WHEEL_VENV}/bin/recnix /usr/local/bin/recnix",
        timeout=300,
    )


SETUP_NIX_CONF = "/etc/nix/recnix.conf"
SETUP_DAEMON_DROPIN = "/etc/systemd/system/nix-daemon.service.d/recnix.conf"


def setup_example_again_and_undo(
    machine: Machine, busybox: str, nix: str
) -> tuple[str, dict[str, str]]:
    """`recnix setup` on a guest recnix was taken away from: doctor all ok, the README's
    example builds with its inner output in the closure, setup again changes nothing,
    `--undo` puts every file back (by hash) and takes recnix's unit away. Returns
    setup's output and what it wrote into SETUP_NIX_CONF and SETUP_DAEMON_DROPIN."""
    before = setup_fingerprint(machine)
    assert "/etc/systemd/system/recnix.service: absent" in before  # taken away
    assert "/etc/nix/nix.conf: absent" not in before
    rc, out, err = machine.execute("recnix setup 2>&1", timeout=900)
    assert rc == 0, out + err
    assert "wrote /etc/nix/recnix.conf" in out
    assert "recnix doctor: everything a recursive build needs is in place" in out, out
    assert "FAIL" not in out, out
    machine.succeed("systemctl is-active recnix.service && systemctl is-enabled recnix.service")
    written = {p: machine.succeed(f"cat {p}") for p in (SETUP_NIX_CONF, SETUP_DAEMON_DROPIN)}

    example = readme_block("# outer.nix")
    command = example.splitlines()[0].split("—", 1)[1].strip()
    machine.succeed(
        f"mkdir -p /root/readme && printf %s {shlex.quote(example)} > /root/readme/outer.nix"
    )
    result = machine.succeed(
        f"cd /root/readme && export nix={nix} bb={busybox} NIX_REMOTE=daemon && {command} 2>&1 "
        "&& NIX_REMOTE=daemon nix-store -qR result",
        timeout=900,
    )
    assert any(line.endswith("-inner") for line in result.splitlines()), result

    again = machine.succeed("recnix setup --no-build 2>&1")
    assert "nothing to change" in again and "wrote" not in again, again

    undone = machine.succeed("recnix setup --undo 2>&1")
    assert "restored /etc/nix/nix.conf" in undone, undone
    assert setup_fingerprint(machine) == before
    rc, _, _ = machine.execute("systemctl is-enabled recnix.service")
    assert rc != 0, "recnix.service is still enabled after --undo"
    machine.fail("systemctl is-active recnix.service")
    return out, written
