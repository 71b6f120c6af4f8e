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
        guards = Guards(tmp_path / "state", max_connections=64)
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


def test_a_guard_holds_at_most_its_connection_limit(tmp_path: Path) -> None:
    """A build that opens connections and never sends a request keeps at most
    max_connections of the service's file descriptors; the others are closed at once,
    and once it lets go the guard answers again."""

    async def scenario() -> None:
        chroot = tmp_path / "outer.drv.chroot"
        chroot.mkdir()
        (tmp_path / "state").mkdir()
        guards = Guards(tmp_path / "state", max_connections=3)
        guard = await guards.open(DRV, chroot)
        held = [await asyncio.open_unix_connection(str(guard.socket_path)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert guard.limit.active == 3
        extra = [await asyncio.open_unix_connection(str(guard.socket_path)) for _ in range(5)]
        for reader, _ in extra:  # closed by the guard without a byte
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert (guard.limit.active, guard.limit.refused) == (3, 5)
        for _, writer in held:
            writer.close()
        deadline = asyncio.get_running_loop().time() + 5
        while guard.limit.active:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        with pytest.raises(UpstreamError) as caught:
            await Upstream.connect(f"unix://{guard.socket_path}")
        assert "without its .drv" in str(caught.value)
        await guards.close()

    asyncio.run(scenario())
