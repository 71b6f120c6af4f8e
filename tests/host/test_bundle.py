"""recnix bundle-nix: Debian's nix and busybox as store paths usable inside builds."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from recnix.cli.bundle import NIX_COMMANDS, bundle_nix, busybox_store_path
from tests import nixversion

pytestmark = pytest.mark.host


def test_busybox_store_path_is_idempotent_and_has_sh(nix_host, busybox):
    assert busybox_store_path(nix_host.env) == busybox
    listing = nix_host.run(["ls", f"{busybox}/bin"]).stdout.split()
    assert {"busybox", "sh", "mkdir", "cat", "ln", "sleep"} <= set(listing)
    assert nix_host.run(["readlink", f"{busybox}/bin/sh"]).stdout.strip() == "busybox"


def test_bundle_is_idempotent(nix_host, nix_bundle):
    assert bundle_nix(nix_host.env) == nix_bundle
    assert nix_host.run(["nix-store", "--verify-path", nix_bundle]).returncode == 0


def test_bundle_closure_holds_busybox_and_the_nix_files(nix_host, nix_bundle, busybox):
    closure = set(nix_host.run(["nix-store", "-qR", nix_bundle]).stdout.split())
    assert busybox in closure
    files = [p for p in closure if p.endswith("-nix-files")]
    assert len(files) == 1, closure
    libs = nix_host.run(["ls", f"{files[0]}/lib"]).stdout.split()
    assert "ld-linux-x86-64.so.2" in libs and "libc.so.6" in libs
    # Debian's 2.8 links Nix's own libraries; newer packages link them statically
    assert ("libnixstore.so" in libs) == nixversion.links_libnixstore(), libs


@pytest.mark.parametrize("command", NIX_COMMANDS)
def test_every_wrapper_starts_with_busybox_sh(nix_bundle, busybox, command):
    with open(f"{nix_bundle}/bin/{command}") as f:
        assert f.readline() == f"#!{busybox}/bin/sh\n"


@pytest.mark.parametrize("command", ["nix", "nix-build", "nix-store", "nix-instantiate"])
def test_wrapper_runs_from_the_host_without_any_environment(nix_bundle, command):
    result = subprocess.run(
        [f"{nix_bundle}/bin/{command}", "--version"], env={}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == nixversion.version_line(command)


def test_wrapper_runs_inside_a_sandboxed_build(nix_host, busybox, nix_bundle):
    """No /usr in the sandbox: the bundle alone must be enough (no recursive Nix needed)."""
    expression = f"""
      let bb = builtins.storePath "{busybox}"; n = builtins.storePath "{nix_bundle}"; in
      derivation {{
        name = "bundle-in-sandbox"; system = builtins.currentSystem;
        builder = "${{bb}}/bin/sh"; tag = "{uuid.uuid4().hex}";
        args = [ "-e" "-c" "test ! -e /usr/bin/nix && ${{n}}/bin/nix --version > $out" ];
      }}"""
    out = nix_host.run(["nix-build", "--no-out-link", "-E", expression]).stdout.split()[-1]
    with open(out) as f:
        assert f.read().splitlines()[0] == nixversion.version_line()
