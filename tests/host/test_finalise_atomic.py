"""Finalisation is all or nothing (issue 19): an output whose references recnix could
not register and check does not stay valid, and the next nix-build rebuilds it."""

from __future__ import annotations

import threading

import pytest

from tests.host.conftest import NixHost
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import BuildOutcome, ScenarioRunner

pytestmark = pytest.mark.host


def scenario_outputs(host: NixHost, runner: ScenarioRunner, argv: list[str]) -> list[str]:
    """The output paths of the derivation a scenario's nix-build command line builds."""
    inst = [runner.command("nix-instantiate"), *[a for a in argv[1:] if a != "--no-out-link"]]
    drv = host.run(inst).stdout.strip()
    return host.run(["nix-store", "-q", "--outputs", drv]).stdout.split()


def assert_invalid(host: NixHost, path: str) -> None:
    """``path`` is not valid: --check-validity and -q --hash both refuse it."""
    for argv in (["nix-store", "--check-validity", path], ["nix-store", "-q", "--hash", path]):
        result = host.run(argv, check=False)
        assert result.returncode != 0, f"{path} is still valid: {argv} said {result.stdout}"


def build_constrained(
    host: NixHost, runner: ScenarioRunner, check: str, tag: str, **extra: str
) -> tuple[BuildOutcome, list[str]]:
    args = {"innerTag": tag, "check": check, **extra}
    argv = runner.build_argv("constrained", RECNIX, tag, args)
    return runner.build("constrained", RECNIX, tag, args), scenario_outputs(host, runner, argv)


def assert_refused_and_rebuilt(
    host: NixHost, runner: ScenarioRunner, check: str, why: str, **extra: str
) -> None:
    """A constrained build fails naming ``why``, leaves its output invalid, and a second
    nix-build builds it again (and fails again) rather than succeeding silently."""
    tag = fresh_tag()
    for attempt in (1, 2):
        outcome, outputs = build_constrained(host, runner, check, tag, **extra)
        assert outcome.rc != 0, f"attempt {attempt}: {outcome.describe()}"
        assert "-scenario-constrained.drv" in outcome.stderr and "building" in outcome.stderr, (
            f"attempt {attempt} did not build: {outcome.describe()}"
        )
        for out in outputs:
            assert_invalid(host, out)
        assert why in outcome.stderr, outcome.describe()
        for out in outputs:
            assert f"output {out} invalidated" in outcome.stderr, outcome.describe()
        assert "the next nix-build rebuilds it" in outcome.stderr, outcome.describe()


def test_allowed_references_violation_invalidates(nix_host_recnix, recnix_runner) -> None:
    """(a) allowedReferences = [] and an output that points at an inner result; an innocent
    recursive build beside it succeeds with a complete closure."""
    innocent: list[str] = []
    beside = threading.Thread(target=lambda: innocent.append(checks.check_inner(recnix_runner, RECNIX)))
    beside.start()
    try:
        assert_refused_and_rebuilt(
            nix_host_recnix, recnix_runner, "allowedReferences", "allowedReferences"
        )
    finally:
        beside.join()
    assert innocent, "the innocent build beside it failed"
