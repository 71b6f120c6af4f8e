"""In-sandbox clients of the other tested Nix versions against this host's recnix.

The host tier runs on Debian 12's Nix 2.8 and, inside their root filesystems
(``recnix_vm.rootfs``), on 2.26 and 2.34. Here each other version's ``nix``
is bundled into this store (``recnix.cli.bundle.bundle_nix(sysroot=...)``, its
libraries from its own root filesystem) and is the client inside recursive
builds: the handshake (logged by the session with both minors), adds and a
nested build must work in both directions, 2.8 <-> 2.26 <-> 2.34.

Every other version's root filesystem must be at hand: on the host they are
made on first use (mmdebstrap, cached); inside a root filesystem the harness
names them in ``$RECNIX_VERSION_ROOTS``. A missing one fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from recnix.cli.bundle import bundle_nix
from tests import nixversion
from tests.host.conftest import NixHost, RecnixService, scenario_runner
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX

pytestmark = [pytest.mark.host, pytest.mark.versions]

VERSIONS = {"bookworm": "2.8", "trixie": "2.26", "sid": "2.34"}


def this_suite() -> str:
    """The suite whose Nix this test process runs against."""
    here = os.environ.get("RECNIX_SUITE")
    if here:
        return here
    mine = ".".join(map(str, nixversion.version()[:2]))
    for suite, v in VERSIONS.items():
        if v == mine:
            return suite
    pytest.fail(f"{nixversion.label()} is none of the tested versions {VERSIONS}", pytrace=False)


def version_roots() -> dict[str, str]:
    """Suite -> its root filesystem as seen from here (every suite but this one)."""
    here = this_suite()
    listed = os.environ.get("RECNIX_VERSION_ROOTS")
    if listed:
        roots = dict(item.split("=", 1) for item in listed.split(",") if item)
    else:  # on the host: the per-version root filesystems, made on first use
        from recnix_vm import rootfs

        roots = {"bookworm": "/"}
        for suite in VERSIONS:  # the Debian suites (the lix suite's Lix is a client of none)
            if suite in rootfs.UID_BASES:
                roots[suite] = str(rootfs.prepare(suite))
    missing = [s for s in VERSIONS if s != here and s not in roots]
    if missing:
        pytest.fail(
            f"no root filesystem of {', '.join(missing)} here: run this test from the host "
            "(it prepares them) or through tests/versions",
            pytrace=False,
        )
    return {s: r for s, r in roots.items() if s != here and s in VERSIONS}


OTHERS = [s for s in VERSIONS if s != os.environ.get("RECNIX_SUITE", "bookworm")]


@pytest.fixture(scope="module")
def roots() -> dict[str, str]:
    return version_roots()


@pytest.mark.parametrize("client", OTHERS)
def test_client_of_another_version(
    client: str,
    roots: dict[str, str],
    nix_host_recnix: NixHost,
    recnix_service: RecnixService,
    busybox: str,
) -> None:
    if client == this_suite():
        pytest.fail(f"{client} is this host's own version", pytrace=False)
    bundle = bundle_nix(nix_host_recnix.env, sysroot=roots[client])
    reported = subprocess.run(
        [f"{bundle}/bin/nix", "--version"], env={}, capture_output=True, text=True, check=True
    ).stdout
    assert re.search(rf"\(Nix\) {re.escape(VERSIONS[client])}\.\d+$", reported.strip()), reported
    runner = scenario_runner(nix_host_recnix, busybox, bundle)
    checks.check_inner(runner, RECNIX)
    checks.check_add(runner, RECNIX)
    # the session logged the handshake with the client: its minor and recnix's
    handshakes = re.findall(
        r"speaks protocol 1\.(\d+) \(it offered 1\.(\d+), recnix 1\.(\d+)\)",
        recnix_service.log_text(),
    )
    client_minor = nixversion.DAEMON_MINOR[tuple(map(int, VERSIONS[client].split(".")))]
    assert any(int(offered) == client_minor for _, offered, _ in handshakes), handshakes
