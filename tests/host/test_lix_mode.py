"""recnix where Nix drops the pre-build hook's output, as Lix 2.93-2.95 does (issue 15).

The scenario tests in test_service.py and test_service_restart.py run in both modes
(``hook_output`` in conftest.py). Here: what happens when the socket cannot reach
the builder, and the CLI parts (bundle-nix --nix, nix-conf) on the real Nix here.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from recnix.cli.bundle import bundle_nix, find_nix_binary
from recnix.cli.nixversion import nix_version
from recnix.sandbox.sandboxsocket import SANDBOX_SOCKET
from tests import nixversion
from tests.host.conftest import (
    RECNIX_BIN,
    SYSTEM_PATH,
    NixHost,
    recnix_config_text,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.scenarios.checks import fresh_tag

pytestmark = pytest.mark.host

# An opted-in build that needs no Nix of its own: it succeeds unless recnix fails it.
WAITING_BUILD = """
let bb = builtins.storePath "{busybox}"; n = builtins.storePath "{nix}"; in
derivation {{
  name = "lix-mode-probe"; system = builtins.currentSystem; tag = "{tag}";
  builder = "${{bb}}/bin/sh"; requiredSystemFeatures = [ "recnix" ];
  PATH = "${{bb}}/bin:${{n}}/bin";
  args = [ "-c" "{script}" ];
}}"""


def build(host: NixHost, busybox: str, nix: str, script: str) -> subprocess.CompletedProcess:
    expression = WAITING_BUILD.format(busybox=busybox, nix=nix, tag=fresh_tag(), script=script)
    return host.run(["nix-build", "--no-out-link", "-E", expression], check=False, timeout=600)


@pytest.fixture
def hiding_host() -> Iterator[NixHost]:
    """Hook output discarded, and the socket recnix put in the chroot removed after the
    hook: a Nix on which neither way reaches the builder."""
    host = start_nix_host(
        hooks=True,
        hook_output="discarded",
        after_hook=f'rm -f "$2{SANDBOX_SOCKET}"\n',
    )
    yield host
    stop_nix_host(host)


def test_a_builder_without_its_socket_is_failed_with_a_message(hiding_host, busybox, nix_bundle):
    """The build is killed (through pidfds) and the reason is where the builder cannot
    redirect it: the service's log, the audit log and `recnix status`; never written
    through the builder's own descriptors (docs/security.md)."""
    service = start_recnix_service(hiding_host)
    try:
        # without recnix noticing, this build would succeed after its sleep
        done = build(hiding_host, busybox, nix_bundle, "sleep 60; echo ok > $out")
        status = service.status()
    finally:
        stop_recnix_service(service)
    assert done.returncode != 0, done.stdout
    assert "signal 9" in done.stderr or "killed" in done.stderr.lower(), done.stderr
    assert status.returncode == 0, status.stderr
    assert "builds recnix failed:" in status.stdout, status.stdout
    assert f"finds no socket at {SANDBOX_SOCKET}" in status.stdout, status.stdout
    assert f"finds no socket at {SANDBOX_SOCKET}" in service.log_text()
    aborted = [e for e in service.audit_events() if e["event"] == "aborted"]
    assert aborted and "finds no socket" in aborted[-1]["reason"], service.audit_events()


@pytest.fixture
def discarding_host_without_service() -> Iterator[NixHost]:
    host = start_nix_host(hooks=True, hook_output="discarded")
    root = host.root / "recnix"
    root.mkdir(mode=0o700)
    host.recnix_config.write_text(recnix_config_text(root, host))  # nobody listens
    yield host
    stop_nix_host(host)


def test_a_hook_error_reaches_the_build_without_the_hook_output(
    discarding_host_without_service, busybox, nix_bundle
):
    """The hook's error line is dropped like its output: the sandbox's nix.conf says it."""
    host = discarding_host_without_service
    done = build(host, busybox, nix_bundle, "nix-store -q --hash $PATH > $out")
    assert done.returncode != 0
    assert "recnix: cannot open a recnix session" in done.stderr, done.stderr
    assert "recnix service is not running" in done.stderr, done.stderr
    assert "/nix/var" not in done.stderr, done.stderr


# The system's nix (Debian's /usr/bin/nix; in the lix suite Lix's /usr/local/bin/nix).
SYSTEM_NIX = shutil.which("nix", path=SYSTEM_PATH) or "/usr/bin/nix"


def test_bundle_nix_takes_the_given_nix(nix_host, nix_bundle):
    assert find_nix_binary(SYSTEM_NIX) == find_nix_binary()  # the one on PATH here
    assert bundle_nix(nix_host.env, nix_binary=SYSTEM_NIX) == nix_bundle
    version = nix_version(SYSTEM_NIX).version
    kind = "lix-" if nixversion.is_lix() else ""  # bundles of Lix say so in their name
    assert nix_bundle.endswith(f"-nix-{kind}{version}-bundle")


def test_bundle_nix_command_with_nix_option(nix_host, nix_bundle):
    done = subprocess.run(
        [str(RECNIX_BIN), "bundle-nix", "--nix", SYSTEM_NIX],
        env=nix_host.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == nix_bundle


def test_bundle_nix_command_names_a_missing_nix(nix_host):
    done = subprocess.run(
        [str(RECNIX_BIN), "bundle-nix", "--nix", "/nonexistent/nix"],
        env=nix_host.env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "/nonexistent/nix" in done.stderr and "--nix PATH" in done.stderr


def test_nix_conf_on_this_nix_keeps_the_builtin():
    """On Nix: the built-in's lines and recnix's build-hook; on Lix (detected from this
    nix): neither."""
    done = subprocess.run(
        [str(RECNIX_BIN), "nix-conf", "--nix", SYSTEM_NIX, "--config", "/dev/null"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    lix = nixversion.is_lix()
    assert ("experimental-features = recursive-nix" in lines) is not lix, done.stdout
    assert any(line.startswith("build-hook = ") for line in lines) is not lix, done.stdout
    assert any(line.startswith("pre-build-hook = ") for line in lines), done.stdout
