"""recnix service on the host: real sandboxed outer builds calling Nix inside (issue 3)."""

from __future__ import annotations

import uuid

import pytest

from tests.scenarios.runner import ScenarioRunner

pytestmark = pytest.mark.host


def fresh() -> str:
    return uuid.uuid4().hex[:12]


def test_inner_build_closure(recnix_runner: ScenarioRunner) -> None:
    outcome = recnix_runner.build("inner", "recnix", tag=fresh())
    assert outcome.ok, outcome.describe()
    inner = recnix_runner.read(outcome.out_path + "/inner-path").strip()
    assert recnix_runner.read(inner).strip() == "hello from the inner build"
    closure = recnix_runner.closure(outcome.out_path)
    assert inner in closure, f"inner output {inner} missing from closure {sorted(closure)}"
    assert recnix_runner.verify_path(outcome.out_path)
