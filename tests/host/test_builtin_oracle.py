"""The scenarios under Nix's built-in recursive-nix: the oracle recnix is compared with.

These prove the scenario files themselves are right; the recnix tier runs the
same scenarios with feature="recnix" and compares.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.host.gc_check import check_gc_during_nested_build
from tests.scenarios import checks

pytestmark = pytest.mark.host

BUILTIN = checks.BUILTIN


def test_inner(oracle_runner):
    checks.check_inner(oracle_runner, BUILTIN)


def test_add(oracle_runner):
    checks.check_add(oracle_runner, BUILTIN)


def test_deep(oracle_runner):
    checks.check_deep(oracle_runner, BUILTIN)


def test_fixed_output(oracle_runner):
    checks.check_fod(oracle_runner, BUILTIN)


def test_failure_fails_and_shows_the_inner_log(oracle_runner):
    _, stderr = checks.check_failure(oracle_runner, BUILTIN)
    assert "unreachable" not in stderr


def test_many(oracle_runner):
    checks.check_many(oracle_runner, BUILTIN, n=3)


def test_denied_paths_stay_hidden(nix_host, oracle_runner):
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "secret")
        with open(path, "w") as f:
            f.write(f"secret {checks.fresh_tag()}\n")
        secret = nix_host.run(["nix-store", "--add", path]).stdout.strip()
    results = checks.check_denied(oracle_runner, BUILTIN, secret)
    # The built-in accepts these two but they change nothing (the secret survives).
    assert results["gc"] == 0 and results["delete"] == 0


def test_added_paths_survive_host_gc_during_a_nested_build(nix_host, oracle_runner):
    """While the nested build waits, the path the outer build added is alive (temp root)."""
    check_gc_during_nested_build(nix_host, oracle_runner, BUILTIN)
