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

import pytest

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
    tag = checks.fresh_tag()
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
    assert checks.assert_complete_reference(oracle_runner, out, "added") == kept_path
    inner = checks.assert_complete_reference(oracle_runner, out, "inner")
    assert oracle_runner.read(inner).startswith("waited ")
