"""GC while a nested build runs: shared by the built-in oracle and the recnix host tests."""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
import time

from tests.nixversion import build_top_glob
from tests.scenarios import checks
from tests.scenarios.runner import ScenarioRunner


def kept_path_of(host, tag: str) -> str:
    """The store path gc.nix adds for ``tag`` (computed, not read back from the build)."""
    with tempfile.TemporaryDirectory() as scratch:
        kept = os.path.join(scratch, "kept.txt")
        with open(kept, "w") as f:
            f.write(f"kept alive during the nested build {tag}\n")
        nar_hash = host.run(["nix-hash", "--type", "sha256", "--base32", kept]).stdout
        fixed_path = ["nix-store", "--print-fixed-path", "--recursive", "sha256"]
        return host.run([*fixed_path, nar_hash.strip(), "kept.txt"]).stdout.strip()


def check_gc_during_nested_build(host, runner: ScenarioRunner, feature: str) -> tuple[str, str]:
    """While gc.nix's nested build waits, host GC must not collect what the outer added.

    Returns the outer output and the added path once the build has finished.
    """
    tag = checks.fresh_tag()
    kept_path = kept_path_of(host, tag)
    argv = runner.build_argv("gc", feature, tag, {"innerTag": tag, "wait": 120})
    build = subprocess.Popen(
        argv, env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        pattern = build_top_glob(host.build_dir, "waiting-inner") + "/started"
        while not (started := glob.glob(pattern)):
            assert build.poll() is None, build.communicate()
            assert time.monotonic() < deadline, "the nested build never started"
            time.sleep(0.1)
        assert os.path.exists(kept_path)
        dead = host.run(["nix-store", "--gc", "--print-dead"]).stdout.split()
        assert kept_path not in dead, f"{kept_path} is not rooted during the nested build"
        deleted = host.run(["nix-store", "--delete", kept_path], check=False)
        assert deleted.returncode != 0 and "still alive" in deleted.stderr, deleted.stderr
        open(os.path.join(os.path.dirname(started[0]), "release"), "w").close()
        stdout, stderr = build.communicate(timeout=120)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()
    assert build.returncode == 0, stderr
    out = stdout.split()[-1]
    assert checks.assert_complete_reference(runner, out, "added") == kept_path
    inner = checks.assert_complete_reference(runner, out, "inner")
    assert runner.read(inner).startswith("waited ")
    return out, kept_path
