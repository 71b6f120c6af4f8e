"""The QEMU harness itself, against a real booted Debian guest (one guest per module).

The tests run in file order on a shared guest; the lifecycle tests (reset,
crash, shutdown) come last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest
from recnix_vm.guestnix import bundle_nix_in_guest, scenario_runner
from recnix_vm.image import POST_BUILD_HOOK, PRE_BUILD_HOOK, READY_MARKER, Image
from recnix_vm.machine import (
    CommandFailed,
    GlobalTimeoutExpired,
    Machine,
    MachineError,
)

from recnix.config.loader import load_defaults, nix_conf_settings

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def machine(module_machine_factory) -> Machine:
    return module_machine_factory("harness")


def test_boot_console_log_and_accel_probe(machine: Machine, vm_image: Image) -> None:
    log_text = machine.console_log.read_text(errors="replace")
    assert "Linux version" in log_text
    assert READY_MARKER.encode() in machine.ready_channel.read_bytes()
    probe = json.loads((vm_image.directory.parent.parent / "kvm-probe.json").read_text())
    assert isinstance(probe["works"], bool) and probe["reason"]
    assert machine.accel_used == ("kvm" if probe["works"] else "tcg")


def test_nix_daemon_active(machine: Machine) -> None:
    machine.wait_for_unit("nix-daemon.socket", timeout=60)
    machine.succeed("nix store ping")  # socket-activates the daemon
    machine.wait_for_unit("nix-daemon.service", timeout=60)


def test_nix_conf_has_recnix_settings(machine: Machine) -> None:
    conf = machine.succeed("cat /etc/nix/nix.conf")
    effective = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(\S+) =[ ]?(.*)$", machine.succeed("nix show-config"), re.M)
    }
    expected = nix_conf_settings(load_defaults(), PRE_BUILD_HOOK, POST_BUILD_HOOK)
    for key, value in expected.items():
        if key.startswith("extra-"):
            base = key.removeprefix("extra-")
            assert set(value.split()) <= set(effective[base].split()), key
        elif key == "experimental-features":
            assert set(value.split()) <= set(effective[key].split())
        else:
            assert effective[key] == value, key
    assert effective["sandbox"] == "true"
    assert effective["build-users-group"] == "nixbld"
    assert "nix-command" in effective["experimental-features"].split()
    assert re.search(r"^sandbox = true$", conf, re.M)
    assert not re.search(r"^sandbox = false$", conf, re.M)
    assert machine.succeed("echo $NIX_PAGER") == "cat\n"  # no pager on the console


def test_nixbld_users_exist(machine: Machine) -> None:
    members = machine.succeed("getent group nixbld").strip().split(":")[3].split(",")
    assert {f"nixbld{i}" for i in range(1, 11)} <= set(members)
    assert "nixbld" in machine.succeed("id -nG nixbld1").split()


def test_execute_separates_stdout_stderr_and_status(machine: Machine) -> None:
    assert machine.execute("echo out; echo err >&2; exit 3") == (3, "out\n", "err\n")
    assert machine.succeed("echo hello; echo noise >&2") == "hello\n"
    assert machine.fail("echo why >&2; false") == "why\n"
    with pytest.raises(CommandFailed) as failed:
        machine.succeed("echo partial; echo broken >&2; exit 7")
    err = failed.value
    assert (err.cmd, err.rc, err.stdout, err.stderr) == (
        "echo partial; echo broken >&2; exit 7",
        7,
        "partial\n",
        "broken\n",
    )
    assert str(machine.console_log) in str(err) and "exit 7" in str(err)
    with pytest.raises(CommandFailed):
        machine.fail("true")
    # Both streams large at once: no deadlock, nothing lost.
    rc, out, errs = machine.execute(
        "(head -c 3000000 /dev/zero | tr '\\0' e >&2) & head -c 3000000 /dev/zero | tr '\\0' o;"
        " wait"
    )
    assert rc == 0 and out == "o" * 3_000_000 and errs == "e" * 3_000_000
    # The guest-side timeout ends a command that runs too long (exit 124).
    start = time.monotonic()
    assert machine.execute("sleep 30", timeout=2)[0] == 124
    assert time.monotonic() - start < 20


def test_execute_streams_stderr_lines_as_they_come(machine: Machine) -> None:
    """The command goes on only once the host has seen its first line (it waits for a
    file the callback makes): lines kept until the end would time it out."""
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "first":
            machine.succeed("touch /tmp/stream-go")

    rc, out, err = machine.execute(
        "rm -f /tmp/stream-go; echo first >&2; "
        "while [ ! -e /tmp/stream-go ]; do sleep 0.1; done; printf 'second\\nlast' >&2",
        timeout=60,
        on_stderr=on_line,
    )
    assert rc == 0, err
    assert seen == ["first", "second", "last"] and err == "first\nsecond\nlast"


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    result: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            result[rel] = ("->" + os.readlink(path), 0)
        elif path.is_dir():
            result[rel] = ("dir", path.stat().st_mode & 0o777)
        else:
            result[rel] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mode & 0o777,
            )
    return result


def test_copy_to_and_from_round_trip(machine: Machine, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "top.txt").write_text("top\n")
    blob = os.urandom(300_000)
    (src / "sub" / "blob.bin").write_bytes(blob)
    (src / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "sub" / "deeper" / "run.sh").chmod(0o755)
    (src / "link").symlink_to("sub/blob.bin")

    machine.copy_to(src, "/root/copied")
    assert machine.succeed("/root/copied/sub/deeper/run.sh") == "ran\n"
    guest_sum = machine.succeed("sha256sum < /root/copied/link").split()[0]
    assert guest_sum == hashlib.sha256(blob).hexdigest()

    machine.copy_to(src / "top.txt", "/root/single.txt")
    assert machine.succeed("cat /root/single.txt") == "top\n"

    back = tmp_path / "back"
    machine.copy_from("/root/copied", back)
    assert _tree_digest(back) == _tree_digest(src)


def test_wait_until_succeeds_and_its_final_attempt(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    machine.succeed(
        "rm -f /tmp/flag; systemd-run --unit=harness-flag sh -c 'sleep 3; touch /tmp/flag'"
    )
    start = time.monotonic()
    assert machine.wait_until_succeeds("test -e /tmp/flag && echo found", timeout=60) == "found\n"
    assert 2 <= time.monotonic() - start < 30
    capsys.readouterr()
    with pytest.raises(TimeoutError, match="did not succeed within 3 s"):
        machine.wait_until_succeeds("echo attempt-diagnostics >&2; false", timeout=3)
    logged = capsys.readouterr().err
    assert "last attempt" in logged and "attempt-diagnostics" in logged


def test_wait_for_unit_fails_fast_on_failed_unit(machine: Machine) -> None:
    machine.execute("systemd-run --unit=harness-boom --property=Type=oneshot false")
    start = time.monotonic()
    with pytest.raises(MachineError, match="harness-boom.service failed"):
        machine.wait_for_unit("harness-boom.service", timeout=120)
    assert time.monotonic() - start < 30
    with pytest.raises(MachineError, match="not loaded"):
        machine.wait_for_unit("no-such-unit.service", timeout=120)


def test_sandboxed_build_with_builtin_recursive_nix(machine: Machine) -> None:
    """Nix's own recursive-nix (the oracle) runs the in-store nix bundle in a sandboxed build."""
    busybox, nix = bundle_nix_in_guest(machine)
    runner = scenario_runner(machine, busybox, nix)
    with machine.nested("building scenario 'inner' with feature recursive-nix"):
        outcome = runner.build("inner", feature="recursive-nix", tag=f"harness-{time.time_ns()}")
    assert outcome.ok, outcome.describe()
    inner = runner.read(f"{outcome.out_path}/inner-path").strip()
    assert runner.read(f"{outcome.out_path}/inner-content") == "hello from the inner build\n"
    assert inner in runner.closure(outcome.out_path)
    assert runner.verify_path(outcome.out_path)
    # The guest's daemon builds in the sandbox (the build above ran under it).
    assert "sandbox = true\n" in machine.succeed("grep '^sandbox = ' /etc/nix/nix.conf")


def test_hard_reset_via_qmp(machine: Machine) -> None:
    boot_id = machine.succeed("cat /proc/sys/kernel/random/boot_id")
    machine.succeed("echo volatile > /run/harness-marker; echo durable > /root/marker; sync")
    machine.reset()
    assert machine.succeed("cat /proc/sys/kernel/random/boot_id") != boot_id
    machine.fail("test -e /run/harness-marker")
    assert machine.succeed("cat /root/marker") == "durable\n"
    machine.wait_for_unit("multi-user.target", timeout=120)


def test_crash_then_boot_again_from_the_same_overlay(machine: Machine) -> None:
    machine.succeed("echo survived > /root/crash-marker; sync")
    machine.crash()
    assert not machine.is_running
    machine.start()
    assert machine.succeed("cat /root/crash-marker") == "survived\n"


def test_acpi_shutdown(machine: Machine) -> None:
    machine.shutdown(timeout=120)
    assert not machine.is_running
    assert "reboot: Power down" in machine.console_log.read_text(errors="replace")


def test_global_timeout_kills_qemu(machine_factory) -> None:
    guest = machine_factory("doomed", start=False, global_timeout=3)
    start = time.monotonic()
    with pytest.raises(GlobalTimeoutExpired):
        guest.start(wait=False)  # under load, QEMU's start may outlast the 3 s itself
        guest.wait_for_console_text("this text never appears", timeout=120)
    assert time.monotonic() - start < 30
    assert not guest.is_running
