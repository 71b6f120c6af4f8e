"""Scenario checks shared by the host tier and the VM tier (no pytest inside).

Each ``check_*`` builds one scenario with a fresh tag through a
:class:`ScenarioRunner` and asserts what a correct recursive build leaves
behind; ``feature`` is "recnix" or "recursive-nix" (Nix's built-in, the oracle).
"""

from __future__ import annotations

import uuid

from tests.scenarios.runner import ScenarioRunner

BUILTIN = "recursive-nix"
RECNIX = "recnix"

# Checks of denied.nix that every implementation must refuse.
DENIED_CHECKS = (
    "exists",
    "query-references",
    "query-hash",
    "check-validity",
    "path-info",
    "realise",
    "build",
    "dump",
    "add-root-secret",
    "repair-path",
    "verify-repair",
    "build-repair",
)
# readonly.nix: queries that must work, and writes that recnix-readonly must refuse.
READONLY_QUERIES = ("query-references", "query-requisites", "check-validity", "path-info")
READONLY_WRITES = ("add", "tofile", "build")


def fresh_tag() -> str:
    """A unique tag: forces a new outer build (and, as innerTag, new nested builds)."""
    return uuid.uuid4().hex[:12]


def build_ok(
    runner: ScenarioRunner, scenario: str, feature: str, inner_tag: str | None = None, **extra
) -> str:
    """Build a scenario that must succeed and pass --verify-path; return its output."""
    tag = fresh_tag()
    outcome = runner.build(scenario, feature, tag, {"innerTag": inner_tag or tag, **extra})
    assert outcome.ok, f"{scenario} ({feature}): {outcome.describe()}"
    assert runner.verify_path(outcome.out_path), f"--verify-path failed for {outcome.out_path}"
    return outcome.out_path


def assert_complete_reference(runner: ScenarioRunner, out: str, linked: str) -> str:
    """``out/linked`` links to a valid path that ``out`` references and keeps alive."""
    target = runner.readlink(f"{out}/{linked}")
    assert target.startswith("/nix/store/"), target
    refs = runner.references(out)
    assert target in refs, f"{out} does not reference {target} (references: {sorted(refs)})"
    assert target in runner.closure(out)
    assert runner.verify_path(target)
    return target


def check_inner(runner: ScenarioRunner, feature: str, inner_tag: str | None = None) -> str:
    out = build_ok(runner, "inner", feature, inner_tag)
    inner = assert_complete_reference(runner, out, "inner")
    assert inner.endswith("-inner")
    assert runner.read(f"{out}/inner-path").strip() == inner
    assert runner.read(inner) == "hello from the inner build\n"
    return out


def check_add(runner: ScenarioRunner, feature: str, inner_tag: str | None = None) -> str:
    tag = inner_tag or fresh_tag()
    out = build_ok(runner, "add", feature, tag)
    added = assert_complete_reference(runner, out, "added")
    tofile = assert_complete_reference(runner, out, "tofile")
    assert added.endswith("-added.txt") and tofile.endswith("-recnix-tofile.txt")
    assert runner.read(added) == f"added by the add scenario {tag}\n"
    assert runner.read(tofile) == f"made by toFile {tag}"
    return out


def check_restart_result(runner: ScenarioRunner, out: str, inner_tag: str) -> None:
    """restart.nix's output: what it added and built before and after the restart."""
    for name in ("added", "before", "after"):
        assert_complete_reference(runner, out, name)
    assert runner.read(f"{out}/added") == f"added before the restart {inner_tag}\n"


def check_deep(runner: ScenarioRunner, feature: str, inner_tag: str | None = None) -> str:
    out = build_ok(runner, "deep", feature, inner_tag)
    middle = assert_complete_reference(runner, out, "middle")
    inner = assert_complete_reference(runner, out, "inner")
    assert middle.endswith("-deep-middle") and inner.endswith("-deep-inner")
    assert inner in runner.references(middle), f"{middle} lost its reference to {inner}"
    return out


def check_fod(runner: ScenarioRunner, feature: str) -> str:
    """A nested fixed-output build (allowed) is built and referenced."""
    tag = fresh_tag()
    out = build_ok(runner, "fod", feature, tag)
    fod = assert_complete_reference(runner, out, "fod")
    assert runner.read(fod) == f"recnix fixed output {tag}\n"
    return out


def check_failure(runner: ScenarioRunner, feature: str) -> tuple[str, str]:
    """The inner build fails: the outer fails and the inner's log line is in its log."""
    tag = fresh_tag()
    outcome = runner.build("failure", feature, tag, {"innerTag": tag})
    assert outcome.rc != 0 and outcome.out_path is None, outcome.describe()
    marker = f"RECNIX-INNER-FAILURE-MARKER tag={tag}"
    assert marker in outcome.stderr, f"inner log line missing: {outcome.describe()}"
    return tag, outcome.stderr


def check_many(runner: ScenarioRunner, feature: str, n: int = 3) -> str:
    out = build_ok(runner, "many", feature, n=n)
    targets = {assert_complete_reference(runner, out, f"inner-{i}") for i in range(1, n + 1)}
    assert len(targets) == n
    return out


def check_denied(runner: ScenarioRunner, feature: str, secret: str) -> dict[str, int]:
    """Every refusal holds and the secret stays out of the closure (and alive)."""
    out = build_ok(runner, "denied", feature, secret=secret)
    results = runner.check_results(out)
    for check in DENIED_CHECKS:
        assert results[check] != 0, f"{check} was allowed: {runner.read(f'{out}/{check}.out')}"
    assert runner.is_valid(secret)
    assert secret not in runner.closure(out)
    return results


def check_readonly(runner: ScenarioRunner) -> dict[str, int]:
    out = build_ok(runner, "readonly", "recnix-readonly")
    results = runner.check_results(out)
    for check in READONLY_QUERIES:
        assert results[check] == 0, f"{check} failed: {runner.read(f'{out}/{check}.err')}"
    for check in READONLY_WRITES:
        assert results[check] != 0, f"{check} was allowed in read-only mode"
        assert "recnix-readonly" in runner.read(f"{out}/{check}.err"), runner.read(
            f"{out}/{check}.err"
        )
    return results


def closure_names(runner: ScenarioRunner, out: str) -> set[str]:
    """Closure of ``out`` without the output itself, as store path names (hash stripped)."""
    return {p.split("-", 1)[1] for p in runner.closure(out) if p != out}


def check_differential(runner: ScenarioRunner, scenario: str) -> None:
    """recnix and the built-in give the same nested outputs and the same closure."""
    check = {"inner": check_inner, "add": check_add, "deep": check_deep}[scenario]
    inner_tag = fresh_tag()
    builtin_out = check(runner, BUILTIN, inner_tag)
    recnix_out = check(runner, RECNIX, inner_tag)
    builtin_closure = runner.closure(builtin_out) - {builtin_out}
    recnix_closure = runner.closure(recnix_out) - {recnix_out}
    if scenario == "deep":
        # the middle derivation requires the feature under test, so its own path
        # differs; everything else, and the names, must agree
        assert closure_names(runner, builtin_out) == closure_names(runner, recnix_out)
        assert runner.readlink(f"{builtin_out}/inner") == runner.readlink(f"{recnix_out}/inner")
        builtin_closure = {p for p in builtin_closure if not p.endswith("-deep-middle")}
        recnix_closure = {p for p in recnix_closure if not p.endswith("-deep-middle")}
    assert builtin_closure == recnix_closure, (
        f"closures differ: only built-in {sorted(builtin_closure - recnix_closure)}, "
        f"only recnix {sorted(recnix_closure - builtin_closure)}"
    )
