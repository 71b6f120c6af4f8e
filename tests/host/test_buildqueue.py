"""More concurrent recursive builds than build users (recnix.hooks.buildqueue, Nix issue #7297).

Nix takes a build user before the pre-build hook runs, so outer builds waiting
there for a session slot would hold every build user, and their nested builds
would wait for one forever. recnix's build hook asks the service to admit each
recursive build before Nix takes a user for it, and answers "postpone" while
the session slots are full. Real nix-daemon (Debian's Nix), real sandboxed
builds, the machine's ``nixbld`` users.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recnix.hooks import control
from recnix.store.nixsettings import build_users, nix_settings
from tests.host.conftest import (
    NixHost,
    RecnixService,
    concurrent_builds,
    require_recnix_build_hook,
    start_nix_host,
    start_recnix_service,
    stop_recnix_service,
)
from tests.scenarios.checks import RECNIX

pytestmark = pytest.mark.host


def test_more_outer_builds_than_build_users_all_finish(busybox: str, nix_bundle: str) -> None:
    require_recnix_build_hook()
    host: NixHost = start_nix_host(hooks=True)  # with recnix's build-hook, as nix-conf prints it
    service = start_recnix_service(host)
    try:
        users = build_users(nix_settings(host.env))
        assert users is not None, "the test daemon builds as the members of a group"
        outer = users[1] + 2
        wall, failures, hangs = concurrent_builds(
            host, busybox, nix_bundle, RECNIX, outer, nested=2, timeout=240
        )
        assert (failures, hangs) == (0, 0), service.log_text()[-3000:]
        assert "waits for a free recnix session slot before it takes a build user" in (
            service.log_text()
        )
    finally:
        stop_recnix_service(service)
        host.stop()


def _recursive_drv(path: Path, name: str) -> str:
    """A .drv text that requires recnix (read by the service, not built)."""
    out = "/nix/store/" + "c" * 32 + f"-{name}"
    path.write_text(
        f'Derive([("out","{out}","","")],[],[],"x86_64-linux","/bin/sh",[],'
        f'[("name","{name}"),("out","{out}"),("requiredSystemFeatures","recnix"),'
        '("system","x86_64-linux")])'
    )
    return str(path)


def test_admission_reserves_a_slot_and_gives_it_back(
    recnix_service: RecnixService, tmp_path: Path
) -> None:
    """`admit` reserves one of daemon.max-sessions (3 here) for each recursive build
    until its session opens; `unadmit` (the build went to a remote machine) gives it
    back. Builds that do not opt in are always admitted."""
    sock = recnix_service.control_socket
    drvs = [_recursive_drv(tmp_path / f"{'a' * 32}-q{i}.drv", f"q{i}") for i in range(4)]

    def admit(drv: str) -> bool:
        return bool(control.request(sock, {"op": "admit", "drv": drv})["admit"])

    assert [admit(d) for d in drvs[:3]] == [True, True, True]
    assert admit(drvs[0])  # admitted again: still its own reservation
    assert not admit(drvs[3]), "a fourth build was admitted with 3 slots"
    control.request(sock, {"op": "unadmit", "drv": drvs[1]})
    assert admit(drvs[3])
    plain = tmp_path / f"{'b' * 32}-plain.drv"
    plain.write_text('Derive([],[],[],"x86_64-linux","/bin/sh",[],[])')
    assert admit(str(plain))
    for drv in (drvs[0], drvs[2], drvs[3]):  # leave the fixture's service as it was
        control.request(sock, {"op": "unadmit", "drv": drv})
