"""The scenarios under Nix's built-in recursive-nix: the oracle recnix is compared with.

These prove the scenario files themselves are right; the recnix tier runs the
same scenarios with feature="recnix" and compares.
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
import time
import uuid

import pytest

from tests.scenarios.runner import ScenarioRunner

pytestmark = pytest.mark.host

BUILTIN = "recursive-nix"
# Checks of the denied scenario that Nix's built-in refuses (see tests/scenarios/README.md).
REFUSED_BY_THE_BUILTIN = (
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


def fresh_tag() -> str:
    return uuid.uuid4().hex[:12]


def build_ok(runner: ScenarioRunner, scenario: str, **extra) -> tuple[str, str]:
    tag = fresh_tag()
    outcome = runner.build(scenario, BUILTIN, tag, {"innerTag": tag, **extra})
    assert outcome.ok, f"{scenario}: {outcome.describe()}"
    assert runner.verify_path(outcome.out_path)
    return outcome.out_path, tag


def assert_complete_reference(runner: ScenarioRunner, out: str, linked: str) -> str:
    """``out/linked`` is a symlink to a valid path that ``out`` references and keeps alive."""
    target = runner.readlink(f"{out}/{linked}")
    assert target.startswith("/nix/store/")
    assert target in runner.references(out)
    assert target in runner.closure(out)
    assert runner.verify_path(target)
    return target


def test_inner(oracle_runner):
    out, _ = build_ok(oracle_runner, "inner")
    inner = assert_complete_reference(oracle_runner, out, "inner")
    assert inner.endswith("-inner")
    assert oracle_runner.read(f"{out}/inner-path").strip() == inner
    assert oracle_runner.read(inner) == "hello from the inner build\n"


def test_add(oracle_runner):
    out, tag = build_ok(oracle_runner, "add")
    added = assert_complete_reference(oracle_runner, out, "added")
    tofile = assert_complete_reference(oracle_runner, out, "tofile")
    assert added.endswith("-added.txt") and tofile.endswith("-recnix-tofile.txt")
    assert oracle_runner.read(added) == f"added by the add scenario {tag}\n"
    assert oracle_runner.read(tofile) == f"made by toFile {tag}"


def test_deep(oracle_runner):
    out, _ = build_ok(oracle_runner, "deep")
    middle = assert_complete_reference(oracle_runner, out, "middle")
    inner = assert_complete_reference(oracle_runner, out, "inner")
    assert middle.endswith("-deep-middle") and inner.endswith("-deep-inner")
    assert inner in oracle_runner.references(middle)


def test_fixed_output(oracle_runner):
    out, _ = build_ok(oracle_runner, "fod")
    fod = assert_complete_reference(oracle_runner, out, "fod")
    assert oracle_runner.read(fod) == "recnix fixed output\n"


def test_failure_fails_and_shows_the_inner_log(oracle_runner):
    tag = fresh_tag()
    outcome = oracle_runner.build("failure", BUILTIN, tag, {"innerTag": tag})
    assert outcome.rc != 0 and outcome.out_path is None
    assert f"RECNIX-INNER-FAILURE-MARKER tag={tag}" in outcome.stderr
    assert "unreachable" not in outcome.stderr


def test_many(oracle_runner):
    out, _ = build_ok(oracle_runner, "many", n=3)
    targets = {assert_complete_reference(oracle_runner, out, f"inner-{i}") for i in (1, 2, 3)}
    assert len(targets) == 3


def test_denied_paths_stay_hidden(nix_host, oracle_runner):
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "secret")
        with open(path, "w") as f:
            f.write(f"secret {fresh_tag()}\n")
        secret = nix_host.run(["nix-store", "--add", path]).stdout.strip()
    out, _ = build_ok(oracle_runner, "denied", secret=secret)
    results = oracle_runner.check_results(out)
    for check in REFUSED_BY_THE_BUILTIN:
        assert results[check] != 0, f"{check}: {oracle_runner.read(f'{out}/{check}.err')}"
    # The built-in accepts these two but they change nothing (the secret survives).
    assert results["gc"] == 0 and results["delete"] == 0
    assert oracle_runner.is_valid(secret)
    assert secret not in oracle_runner.closure(out)


def test_added_paths_survive_host_gc_during_a_nested_build(nix_host, oracle_runner):
    """While the nested build waits, the path the outer build added is alive (temp root)."""
    tag = fresh_tag()
    with tempfile.TemporaryDirectory() as scratch:
        kept = os.path.join(scratch, "kept.txt")
        with open(kept, "w") as f:
            f.write(f"kept alive during the nested build {tag}\n")
        nar_hash = nix_host.run(["nix-hash", "--type", "sha256", "--base32", kept]).stdout
        fixed_path = ["nix-store", "--print-fixed-path", "--recursive", "sha256"]
        kept_path = nix_host.run([*fixed_path, nar_hash.strip(), "kept.txt"]).stdout.strip()
    argv = oracle_runner.build_argv("gc", BUILTIN, tag, {"innerTag": tag, "wait": 120})
    build = subprocess.Popen(
        argv, env=nix_host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (started := glob.glob(f"{nix_host.build_dir}/nix-build-waiting-inner*/started")):
            assert build.poll() is None, build.communicate()
            assert time.monotonic() < deadline, "the nested build never started"
            time.sleep(0.1)
        assert os.path.exists(kept_path)
        dead = nix_host.run(["nix-store", "--gc", "--print-dead"]).stdout.split()
        assert kept_path not in dead
        deleted = nix_host.run(["nix-store", "--delete", kept_path], check=False)
        assert deleted.returncode != 0 and "still alive" in deleted.stderr, deleted.stderr
        open(os.path.join(os.path.dirname(started[0]), "release"), "w").close()
        stdout, stderr = build.communicate(timeout=120)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()
    assert build.returncode == 0, stderr
    out = stdout.split()[-1]
    assert assert_complete_reference(oracle_runner, out, "added") == kept_path
    inner = assert_complete_reference(oracle_runner, out, "inner")
    assert oracle_runner.read(inner).startswith("waited ")
