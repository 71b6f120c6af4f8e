"""recnix.remote.guards: the guard socket of a build whose .drv is not in the store (issue 12)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from recnix.remote.guards import Guards, absent_drv_message
from recnix.store.upstream import Upstream, UpstreamError

DRV = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-outer.drv"


def test_guard_answers_a_nix_client_with_the_cause_and_ends_with_the_chroot(
    tmp_path: Path,
) -> None:
    async def scenario() -> str:
        chroot = tmp_path / "outer.drv.chroot"
        chroot.mkdir()
        guards = Guards(tmp_path / "state")
        (tmp_path / "state").mkdir()
        guard = await guards.open(DRV, chroot)
        assert guard.socket_path.is_socket()
        with pytest.raises(UpstreamError) as caught:
            await Upstream.connect(f"unix://{guard.socket_path}")
        chroot.rmdir()
        await guards.sweep()
        assert not guard.directory.exists() and not guards.guards
        await guards.close()
        return str(caught.value)

    message = asyncio.run(scenario())
    assert absent_drv_message(DRV) in message, message
    assert "without its .drv" in message and "trusted-users" in message
