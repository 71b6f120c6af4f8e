"""More concurrent recursive builds than build users (recnix.buildqueue, Nix issue #7297).

Nix takes a build user before the pre-build hook runs, so outer builds waiting
there for a session slot would hold every build user, and their nested builds
would wait for one forever. recnix's build hook asks the service to admit each
recursive build before Nix takes a user for it, and answers "postpone" while
the session slots are full. Real nix-daemon (Debian's Nix), real sandboxed
builds, the machine's ``nixbld`` users.
"""

from __future__ import annotations

import pytest

from recnix.nixsettings import build_users, nix_settings
from tests.host.conftest import (
    NixHost,
    concurrent_builds,
    start_nix_host,
    start_recnix_service,
    stop_recnix_service,
)
from tests.scenarios.checks import RECNIX

pytestmark = pytest.mark.host

# Postponed builds ask again after build-poll-interval seconds (Nix's default: 5).
POLL = "build-poll-interval = 1\n"


def test_more_outer_builds_than_build_users_all_finish(busybox: str, nix_bundle: str) -> None:
    host: NixHost = start_nix_host(hooks=True, extra_conf=POLL)  # with recnix's build-hook
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
