"""What the service puts into an opted-in build's chroot: the session's socket at the
path the builder's Nix looks for (recnix.sandbox.sandboxsocket), served for the session,
and an ``/etc/nix/nix.conf`` for the Nix client inside."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from recnix.daemon.session import ClientProtocol, Session
from recnix.sandbox import sandboxsocket

log = logging.getLogger("recnix.daemon.chroot")

# Written into the sandbox so `nix` (new CLI) works there and never tries the
# network (Nix issues #3275, #8698).
SANDBOX_NIX_CONF = """\
# written by recnix for the Nix client inside this build
experimental-features = nix-command
substituters =
"""


def write_sandbox_nix_conf(chroot: Path) -> None:
    """Give the sandbox an /etc/nix/nix.conf for the Nix inside, unless Nix put one there."""
    conf_dir = chroot / "etc" / "nix"
    conf = conf_dir / "nix.conf"
    if conf.exists() or conf.is_symlink():
        return
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text(SANDBOX_NIX_CONF)
    conf.chmod(0o444)


class ChrootSockets:
    """The sessions' sockets inside their chroots, each served while its session lives."""

    def __init__(self) -> None:
        # sid -> (server, inode) of each session's socket inside its chroot
        self._served: dict[str, tuple[asyncio.base_events.Server, int]] = {}

    async def place(self, session: Session) -> None:
        """Listen for ``session`` also at <chroot>/nix/var/nix/daemon-socket/socket, which
        the builder sees whether or not Nix honours the pre-build hook's output (Lix
        drops it); replaces the socket of a previous run. PlacementError if it is not in
        place afterwards."""
        self.drop(session, unlink=False)
        sock, inode = sandboxsocket.place(session.chroot)
        try:
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: ClientProtocol(session), sock=sock
            )
        except OSError as e:
            sock.close()
            raise sandboxsocket.PlacementError(f"cannot serve the chroot socket: {e}") from e
        self._served[session.sid] = (server, inode)
        if not sandboxsocket.in_place(session.chroot, inode):
            raise sandboxsocket.PlacementError(
                f"{session.chroot}{sandboxsocket.SANDBOX_SOCKET} is not the session's socket "
                "right after it was made there"
            )

    def drop(self, session: Session, unlink: bool = True) -> None:
        """Stop serving the chroot socket of ``session``; with ``unlink``, remove its name
        too (if it is still ours; Nix may have deleted the chroot already)."""
        entry = self._served.pop(session.sid, None)
        if entry is None:
            return
        server, inode = entry
        server.close()
        if unlink and sandboxsocket.in_place(session.chroot, inode):
            try:
                os.unlink(f"{session.chroot}{sandboxsocket.SANDBOX_SOCKET}")
            except OSError as e:
                log.debug("session %s: cannot remove its chroot socket: %s", session.sid, e)
