"""recnix on the host: real sandboxed outer builds that call Nix inside (issue 3).

The same scenario checks run under Nix's built-in recursive-nix in
test_builtin_oracle.py; here they run under recnix, then both are compared.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.host.conftest import (
    NixHost,
    RecnixService,
    require_builtin_recursive_nix,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.host.gc_check import check_gc_during_nested_build
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner

pytestmark = pytest.mark.host


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def sessions_of(service: RecnixService, drv_suffix: str) -> list[str]:
    return [
        e["session"]
        for e in service.audit_events()
        if e["event"] == "opened" and e["drv"].endswith(drv_suffix)
    ]


def events_of(service: RecnixService, session: str) -> list[dict]:
    return [e for e in service.audit_events() if e["session"] == session]


def assert_nothing_left(service: RecnixService) -> None:
    """No session sockets, no recnix mounts in the host mount table."""
    wait_until(lambda: not service.session_dirs(), 15, "session sockets to go away")
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    assert ".drv.chroot" not in mounts, mounts


def test_inner_build(recnix_runner: ScenarioRunner) -> None:
    checks.check_inner(recnix_runner, RECNIX)


def test_add(recnix_runner: ScenarioRunner) -> None:
    checks.check_add(recnix_runner, RECNIX)


def test_deep_three_levels(recnix_runner: ScenarioRunner, recnix_service: RecnixService) -> None:
    out = checks.check_deep(recnix_runner, RECNIX)
    middle = [s for s in sessions_of(recnix_service, "-deep-middle.drv")]
    assert middle, "the middle build did not get its own recnix session"
    opened = [e for e in events_of(recnix_service, middle[-1]) if e["event"] == "opened"]
    assert opened[0]["depth"] == 2 and opened[0]["parent"]
    tree = subprocess.run(
        [str(recnix_service_bin()), "tree", out],
        env={**recnix_service.host.env, "RECNIX_CONFIG": str(recnix_service.config_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert tree.returncode == 0, tree.stderr
    assert "-deep-middle.drv" in tree.stdout and "-deep-inner.drv" in tree.stdout, tree.stdout


def recnix_service_bin():
    from tests.host.conftest import RECNIX_BIN

    return RECNIX_BIN


def test_many_nested_builds(recnix_runner: ScenarioRunner) -> None:
    checks.check_many(recnix_runner, RECNIX, n=3)


def test_readonly(recnix_runner: ScenarioRunner) -> None:
    checks.check_readonly(recnix_runner)


def test_denied(nix_host_recnix: NixHost, recnix_runner: ScenarioRunner) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "secret")
        with open(path, "w") as f:
            f.write(f"secret {fresh_tag()}\n")
        secret = nix_host_recnix.run(["nix-store", "--add", path]).stdout.strip()
    results = checks.check_denied(recnix_runner, RECNIX, secret)
    # recnix makes GC inert rather than pretending: the secret is still there
    assert recnix_runner.is_valid(secret)
    assert set(checks.DENIED_CHECKS) <= set(results)


def test_failure_leaves_nothing(recnix_runner: ScenarioRunner, recnix_service) -> None:
    tag, _ = checks.check_failure(recnix_runner, RECNIX)
    sessions = sessions_of(recnix_service, "-scenario-failure.drv")
    assert sessions
    wait_until(
        lambda: any(e["event"] == "aborted" for e in events_of(recnix_service, sessions[-1])),
        15,
        "the failed build's session to be aborted",
    )
    assert_nothing_left(recnix_service)
    added = [e["path"] for e in events_of(recnix_service, sessions[-1]) if e["event"] == "added"]
    assert added, "the failure scenario should have added its inner .drv"
    dead = set(recnix_runner._checked(["nix-store", "--gc", "--print-dead"]).split())
    still_rooted = [p for p in added if p not in dead]
    assert not still_rooted, f"paths of a failed build are still rooted: {still_rooted}"


def test_fixed_output_refused_by_default(recnix_runner: ScenarioRunner) -> None:
    tag = fresh_tag()
    outcome = recnix_runner.build("fod", RECNIX, tag, {"innerTag": tag})
    assert outcome.rc != 0, outcome.describe()
    assert "fixed-output" in outcome.stderr and "allow-fixed-output" in outcome.stderr


@pytest.fixture(scope="module")
def fod_host(busybox: str, nix_bundle: str) -> Iterator[tuple[NixHost, ScenarioRunner]]:
    host = start_nix_host(hooks=True)
    service = start_recnix_service(host, "[policy]\nallow-fixed-output = true\n")
    try:
        yield host, scenario_runner(host, busybox, nix_bundle)
    finally:
        stop_recnix_service(service)
        stop_nix_host(host)


def test_fixed_output_allowed_when_configured(fod_host) -> None:
    _, runner = fod_host
    checks.check_fod(runner, RECNIX)


@pytest.mark.parametrize("scenario", ["inner", "add", "deep"])
def test_differential_against_builtin(recnix_runner: ScenarioRunner, scenario: str) -> None:
    require_builtin_recursive_nix()
    checks.check_differential(recnix_runner, scenario)


def test_gc_during_and_after_nested_build(
    nix_host_recnix: NixHost, recnix_runner: ScenarioRunner, recnix_service: RecnixService
) -> None:
    """Paths the session added survive GC while the nested build runs and after the build."""
    out, kept = check_gc_during_nested_build(nix_host_recnix, recnix_runner, RECNIX)
    session = sessions_of(recnix_service, "-scenario-gc.drv")[-1]
    added = [e["path"] for e in events_of(recnix_service, session) if e["event"] == "added"]
    assert kept in added, f"the added file is not in the session's audit log: {added}"
    # after the build: everything the output refers to is alive through the output
    with tempfile.TemporaryDirectory() as scratch:
        root = os.path.join(scratch, "result")
        nix_host_recnix.run(["nix-store", "--add-root", root, "--indirect", "--realise", out])
        dead = set(nix_host_recnix.run(["nix-store", "--gc", "--print-dead"]).stdout.split())
        closure = recnix_runner.closure(out)
        assert kept in closure
        assert not (closure & dead), f"closure members would be collected: {closure & dead}"
    assert_nothing_left(recnix_service)
